"""Evaluation: our FID / IS / CLIPScore equal torchmetrics on the same images and extractor; the real
statistics cache is reused and invalidated; two gloo ranks give the single-process FID; the
callback logs the same FID as torchmetrics on the images it drew; t2i-eval runs the shapes and
reconstruction protocols on checkpoints trained here."""

import json
import os

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from t2i.errors import T2IError
from t2i.eval.generation import build_scores
from t2i.metrics.scores import GenerationScores, RealStatsCache, to_uint8


class TinyFeatures(nn.Module):
    """A random-weight stand-in for Inception: uint8 images -> ``num_features`` features."""

    def __init__(self, num_features: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 4 * 4, num_features)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.num_features = num_features
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = x.float() / 255
        x = nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4)
        return self.fc(x.flatten(1))


def fake_real(n=40, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    fake = (real * 0.5 + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    return real, fake


def frechet_numpy(a, b) -> float:
    """The Fréchet distance of two feature sets written from its definition with numpy / scipy:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))`` (unbiased covariances)."""
    import numpy as np
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def test_scores_equal_torchmetrics_on_the_same_images():
    real, fake = fake_real()
    scores = GenerationScores(TinyFeatures(), TinyFeatures(num_features=10, seed=1), is_splits=4, seed=3)
    for i in range(0, 40, 16):  # uneven batches
        scores.update_real(real[i:i + 16])
        scores.update_fake(fake[i:i + 16])
    ours = scores.compute()
    fid = FrechetInceptionDistance(feature=TinyFeatures())
    fid.update(to_uint8(real), real=True)
    fid.update(to_uint8(fake), real=False)
    inception = InceptionScore(feature=TinyFeatures(num_features=10, seed=1), splits=4)
    inception.update(to_uint8(fake))
    torch.manual_seed(3)
    is_mean, is_std = inception.compute()
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert ours["is_mean"] == pytest.approx(float(is_mean), rel=1e-6)
    assert ours["is_std"] == pytest.approx(float(is_std), rel=1e-6)
    scores.reset()  # fake side forgotten, real kept
    scores.update_fake(real)
    assert scores.compute()["fid"] == pytest.approx(0.0, abs=1e-3)
    # uint8 quantisation is what a saved PNG holds
    x = torch.tensor([-1.0, -0.99, 0.0, 0.999, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 1, 128, 255, 255]


class FakeCLIP(nn.Module):
    """Features from fixed projections: enough to check the CLIPScore arithmetic."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    @property
    def device(self):
        return torch.device("cpu")

    def image_features(self, images):
        return nn.functional.normalize(self.proj(images.float().mean((2, 3))), dim=-1)

    def text_features(self, texts):
        g = [torch.Generator().manual_seed(len(t)) for t in texts]
        return nn.functional.normalize(torch.stack([torch.randn(4, generator=x) for x in g]), dim=-1)


def test_clip_score_and_fd_clip():
    torch.manual_seed(0)
    clip = FakeCLIP()
    real, fake = fake_real(20)
    scores = GenerationScores(None, None, clip)
    scores.update_real(real)
    texts = ["a" * (i % 5 + 1) for i in range(20)]
    scores.update_fake(fake[:12], texts[:12])
    scores.update_fake(fake[12:], texts[12:])
    out = scores.compute()
    x = to_uint8(fake).float() / 127.5 - 1
    cos = (clip.image_features(x) * clip.text_features(texts)).sum(-1)
    assert out["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert "fid" not in out
    with torch.no_grad():  # FD-CLIP: the Fréchet distance of the CLIP embeddings of the saved (uint8) images
        feats = [clip.image_features(to_uint8(x).float() / 127.5 - 1).numpy() for x in (real, fake)]
    assert out["fd_clip"] == pytest.approx(frechet_numpy(*feats), rel=1e-4)
    assert out["fd_clip"] > 1e-5  # the two sets differ: a non-trivial comparison


def test_real_statistics_cache_reused_and_invalidated(tmp_path):
    real, fake = fake_real()
    ex = TinyFeatures()
    first = GenerationScores(ex)
    key = dict(dataset="toy", split="val", resolution=16, n=40, extractors=first.describe())
    cache = RealStatsCache(tmp_path, **key)
    assert cache.load() is None
    first.update_real(real)
    first.update_fake(fake)
    cache.save(first.real_state())
    want = first.compute()["fid"]

    ex2 = TinyFeatures()
    second = GenerationScores(ex2)
    state = RealStatsCache(tmp_path, **dict(key, extractors=second.describe())).load()
    assert state is not None  # same key: reused
    second.load_real_state(state)
    second.update_fake(fake)
    assert ex2.calls == 1  # only the fake batch went through the extractor
    assert second.compute()["fid"] == pytest.approx(want, rel=1e-9)
    assert RealStatsCache(tmp_path, **dict(key, resolution=32)).load() is None  # other resolution
    other = GenerationScores(TinyFeatures(seed=5)).describe()
    assert other != key["extractors"]
    assert RealStatsCache(tmp_path, **dict(key, extractors=other)).load() is None  # other extractor weights
    cache.path.write_bytes(b"truncated")  # a broken file is recomputed, not trusted
    assert cache.load() is None


def all_scores(seed=0):
    """FID, IS, CLIPScore and FD-CLIP, each extractor seeded (the same in every process)."""
    torch.manual_seed(seed)
    return GenerationScores(TinyFeatures(), TinyFeatures(num_features=10, seed=1), FakeCLIP(), is_splits=3, seed=5)


def feed(scores, rank=0, world=1, n=40, batch=8):
    """Batch k of ``n`` images to rank ``k % world`` as the eval loop deals them: 5 batches here, so with
    two ranks rank 0 gets three (one of them short when n is not a multiple of 8) and rank 1 two."""
    real, fake = fake_real(n)
    texts = ["a" * (i % 5 + 1) for i in range(n)]
    for k, start in enumerate(range(0, n, batch)):
        if k % world == rank:
            scores.update_real(real[start:start + batch])
            scores.update_fake(fake[start:start + batch], texts[start:start + batch], start)


def _scores_rank(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    scores = all_scores()
    feed(scores, rank, world, n=37)
    state = scores.real_state()
    first = scores.compute()
    scores.reset()  # a second round in which rank 1 draws nothing at all (fewer batches than ranks)
    feed(scores, rank, world, n=6)
    second = scores.compute()
    if rank == 0:
        torch.save({"first": first, "second": second, "n": int(state["fid"]["real_features_num_samples"])}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_metrics_two_gloo_ranks_with_uneven_batches_equal_one_process(tmp_path):
    """FID, IS, CLIPScore and FD-CLIP with one rank holding an extra (and a short) batch, and with a rank
    holding none, equal one process (torchmetrics' IS gathered its logits list tensor by tensor and hung
    or crashed there; FID crashed on a rank without images)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "scores.pt"
    mp.spawn(_scores_rank, args=(2, port, str(out)), nprocs=2)
    single = all_scores()
    feed(single, n=37)
    want = single.compute()
    single.reset()
    feed(single, n=6)
    want_second = single.compute()
    got = torch.load(out)
    assert got["n"] == 37  # the cached real state holds both ranks' images
    assert set(want) == {"fid", "fd_clip", "is_mean", "is_std", "clip_score"} == set(got["first"])
    for k in want:
        assert got["first"][k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
        assert got["second"][k] == pytest.approx(want_second[k], rel=1e-6, abs=1e-9), k
    assert want["is_mean"] != pytest.approx(want_second["is_mean"])  # the rounds differ: a real comparison


def test_missing_inception_weights_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(T2IError, match=r"weights-inception-2015-12-05-6726825d\.pth.*github\.com/toshas"):
        build_scores({"extractor": "inception"})
    with pytest.raises(T2IError, match="not found at feature_extractor_weights_path=/nope.pth"):
        build_scores({"extractor": None, "inception_score": True, "feature_extractor_weights_path": "/nope.pth"})


def test_inception_extractor_loads_local_weights(tmp_path):
    """The real loading path: torch-fidelity's network with weights from our file (random here)."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from t2i.metrics.features import INCEPTION_FILE, InceptionFeatures

    class Unloaded(FeatureExtractorInceptionV3):  # build the architecture without fetching weights
        def load_state_dict(self, *a, **k):
            return None

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        net = Unloaded("inception-v3-compat", ["2048", "logits_unbiased"])
    path = tmp_path / INCEPTION_FILE
    torch.save(nn.Module.state_dict(net), path)
    ex = InceptionFeatures(str(path), "2048")
    logits = InceptionFeatures(str(path), "logits_unbiased")
    for name, t in nn.Module.state_dict(net).items():  # every tensor of the file, loaded
        assert torch.equal(ex.net.state_dict()[name], t), name
    x = torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net.eval()
    with torch.no_grad():  # torch-fidelity's own forward (its TF1-style resize) of the same weights
        want_pool, want_logits = net(x)
    got_pool, got_logits = ex(x), logits(x)
    assert got_pool.shape == (2, 2048) and got_logits.shape == (2, 1008)
    assert torch.allclose(got_pool, want_pool, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got_pool[0], got_pool[1])  # two different images, two different features
    assert json.dumps(GenerationScores(ex).describe())  # hash of the weights file


# -- end to end on checkpoints trained here ---------------------------------------------------------
from tests.test_clip import compose_clip  # noqa: E402
from tests.test_transformer_train import codes, compose_transformer  # noqa: E402,F401

TINY = "{_target_:tests.test_eval.TinyFeatures}"
TINY_IS = "{_target_:tests.test_eval.TinyFeatures,num_features:10,seed:1}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, codes):  # noqa: F811
    """A 2-layer transformer on toy codes with the GenerationMetrics callback on, and a tiny CLIP."""
    from t2i.cli.train import train

    tmp = tmp_path_factory.mktemp("eval")
    gm = "callbacks.generation_metrics"
    cfg = compose_transformer(tmp, codes, "trainer.max_epochs=3", "model.warmup_steps=5", "model.lr=3e-3",
                              "callbacks=metrics", f"{gm}.num_captions=12", f"{gm}.batch_size=5",
                              f"{gm}.metrics.extractor={TINY}", f"{gm}.metrics.is_extractor={TINY_IS}",
                              f"{gm}.metrics.is_splits=2", f"{gm}.metrics.cache_dir={tmp}/cache",
                              f"{gm}.every_n_val_epochs=1")
    metrics, obj = train(cfg)
    clip_metrics, clip_obj = train(compose_clip(tmp / "clip", "trainer.max_epochs=2", "model.warmup_steps=2"))
    return tmp, metrics, obj, clip_obj["trainer"].checkpoint_callback.best_model_path


def test_callback_fid_and_is_equal_torchmetrics(trained):
    """The logged val/fid and val/is_mean of the last epoch equal torchmetrics run directly on the
    images the callback drew (redrawn with its seeds from the final weights)."""
    from t2i.eval.generation import draw
    from t2i.lit.transformer import TransformerModule
    from t2i.sampling import decode_codes

    tmp, metrics, obj, _ = trained
    assert {"val/fid", "val/is_mean", "val/is_std"} <= set(metrics)
    assert list((tmp / "cache").glob("*.pt"))  # real statistics cached on the first epoch
    assert list((tmp / "run" / "images").glob("val_epoch002_generations.png"))
    module = TransformerModule.load_from_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt").eval()
    dm = obj["datamodule"]
    ds = dm.val_dataloader().dataset
    items = [ds[i] for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:12].tolist()]
    captions = [it["caption"] for it in items]
    model = module.sampling_model()
    images = []
    for start in range(0, 12, 5):
        caps = captions[start:start + 5]
        out = draw(model, module.image_tokenizer, dm.tokenizer.encode(caps, model.text_len), caps, 1, None,
                   torch.Generator().manual_seed(start), temperature=1.0, use_cache=True)
        images.append(out.images)
    fake = to_uint8(torch.cat(images))
    real = to_uint8(decode_codes(module.image_tokenizer, torch.stack([torch.as_tensor(it["codes"]) for it in items]).long()))
    fid = FrechetInceptionDistance(feature=TinyFeatures())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    inception = InceptionScore(feature=TinyFeatures(num_features=10, seed=1), splits=2)
    inception.update(fake)
    torch.manual_seed(0)
    assert metrics["val/fid"] == pytest.approx(float(fid.compute()), rel=1e-4)
    assert metrics["val/is_mean"] == pytest.approx(float(inception.compute()[0]), rel=1e-4)


def eval_cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("eval", overrides=[f"paths.root_dir={tmp_path}", f"output={tmp_path}/out",
                                          f"metrics.cache_dir={tmp_path}/cache", "progress=false", "device=cpu",
                                          *overrides])


def test_t2i_eval_shapes(trained, tmp_path):
    from t2i.cli.evaluate import run

    tmp, _, _, clip_ckpt = trained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    args = ["eval=shapes", f"ckpt={ckpt}", f"clip.ckpt={clip_ckpt}", "eval.num_captions=12",
            "eval.num_candidates=3", "batch_size=5", "metrics.extractor=null", "metrics.inception_score=false"]
    result = run(eval_cfg(tmp_path, *args))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["summary"] == pytest.approx(result["summary"])
    s = saved["summary"]
    assert {"acc_first", "acc_rerank", "acc_compositional_first", "acc_compositional_rerank", "fd_clip",
            "clip_score"} <= set(s)
    assert all(0 <= s[k] <= 1 for k in s if k.startswith("acc"))
    test = saved["splits"]["test"]
    assert set(test["acc_first"]) == {"color", "shape", "position", "size", "all"} and test["n"] == 12
    assert saved["protocol"]["reranked"] and saved["versions"]["torch"] and saved["checkpoints"]["transformer_sha256"]
    assert "clip_score" in saved["splits"]["compositional"]["extractors"]
    assert not test["real_from_cache"]
    assert (tmp_path / "out" / "samples.png").is_file() and "| **ours**" in (tmp_path / "out" / "metrics.md").read_text()
    again = run(eval_cfg(tmp_path, *args))  # same command, same numbers; real statistics from the cache
    assert again["splits"]["test"]["real_from_cache"]
    assert again["summary"] == pytest.approx(result["summary"], rel=1e-6)


def test_t2i_eval_reconstruction(trained, codes, tmp_path):  # noqa: F811
    from t2i.cli.evaluate import run

    tok_ckpt = codes.parent / "tok.ckpt"  # the stage-1 checkpoint the codes were made with
    result = run(eval_cfg(tmp_path, "eval=reconstruction", f"tokenizer_ckpt={tok_ckpt}", "eval.image_size=16",
                          "eval.num_captions=20", "batch_size=8", f"metrics.extractor={TINY}", "metrics.lpips=false"))
    m = result["splits"]["test"]
    assert m["n"] == 20 and 0 < m["ssim"] <= 1
    # PSNR and rFID recomputed independently: the same 20 Shapes images through the tokenizer, the
    # reconstructions quantised to uint8, PSNR per image from its MSE in numpy, rFID with scipy's sqrtm
    import numpy as np

    from t2i.cli.evaluate import shapes_items
    from t2i.pretrained.image_tokenizers import load_tokenizer

    real = shapes_items("test", 20, 0, 16, "zh").real(0, 20)
    tok = load_tokenizer(str(tok_ckpt)).eval()
    with torch.no_grad():
        recon = to_uint8(tok.decode(tok.encode(real.float() / 127.5 - 1)))
    a, b = real.numpy().astype(np.float64) / 255, recon.numpy().astype(np.float64) / 255
    mse = ((a - b) ** 2).reshape(20, -1).mean(1)
    assert m["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), rel=1e-5)
    with torch.no_grad():
        feats = [TinyFeatures()(x).numpy() for x in (real, recon)]
    assert m["rfid"] == pytest.approx(frechet_numpy(*feats), rel=1e-4)
    assert m["rfid"] > 1e-3 and 15 < m["psnr"] < 80  # imperfect reconstructions: the comparisons mean something
    assert 0 < m["codebook_used"] <= 64
    from PIL import Image

    grid = Image.open(tmp_path / "out" / "reconstructions.png")  # 8 (original, reconstruction) pairs
    assert grid.size == (3 + 8 * (128 + 3), 3 + 2 * (128 + 3))  # 16 px upscaled x8, 3 px frames
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]["psnr"] == pytest.approx(m["psnr"])


def test_t2i_eval_errors(tmp_path):
    from t2i.cli.evaluate import run
    from t2i.errors import ConfigError

    with pytest.raises(ConfigError, match="needs ckpt="):
        run(eval_cfg(tmp_path, "eval=shapes"))
    with pytest.raises(ConfigError, match="needs tokenizer_ckpt="):
        run(eval_cfg(tmp_path, "eval=reconstruction"))
    with pytest.raises(ConfigError, match="autocast='fp8': use auto, bf16, fp16 or null"):
        run(eval_cfg(tmp_path, "eval=shapes", "ckpt=x.ckpt", "autocast=fp8"))
    with pytest.raises(ConfigError, match="autocast=fp16 needs a GPU"):
        run(eval_cfg(tmp_path, "eval=shapes", "ckpt=x.ckpt", "autocast=fp16"))
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "t2i.cli.evaluate", "eval=shapes", f"paths.root_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and "error: eval=shapes needs ckpt=" in res.stderr, res.stderr[-1000:]


def test_t2i_eval_process_group_from_srun_and_torchrun_variables(monkeypatch):
    """srun's variables become torchrun's (rank, world, local rank, the job's first node as master);
    a WORLD_SIZE without a master is one clear error, not a hang."""
    from t2i.cli.evaluate import slurm_to_torchrun_env, start_processes
    from t2i.errors import ConfigError

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "x")  # recorded, so what the code under test sets is removed afterwards
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    slurm_to_torchrun_env()
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "20123"}
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # an sbatch script's own export wins
    monkeypatch.delenv("WORLD_SIZE")
    slurm_to_torchrun_env()
    assert os.environ["MASTER_ADDR"] == "10.0.0.1"
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4 but MASTER_ADDR not set: start t2i-eval with torchrun"):
        start_processes(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert start_processes(torch.device("cpu")) is False  # one process: no group


def test_t2i_eval_coco30k_protocol_on_a_tiny_val2014(trained, tmp_path):
    """The generation protocol path (data source, seeded caption pick, FID + IS, anchors table) on six
    COCO-style images laid out by experiments/coco30k/prepare.py; one image is corrupt."""
    import importlib.util

    from PIL import Image

    from t2i.cli.evaluate import run

    spec = importlib.util.spec_from_file_location("prepare", "experiments/coco30k/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    val = tmp_path / "val2014"
    val.mkdir()
    images, anns = [], []
    for i in range(7):
        name = f"COCO_val2014_{i:012d}.jpg"
        images.append({"id": i, "file_name": name})
        anns += [{"image_id": i, "caption": f"a photo number {i}"}, {"image_id": i, "caption": f"picture {i} "}]
        if i < 6:
            Image.new("RGB", (24, 20), (30 * i, 100, 200 - 20 * i)).save(val / name)
    (val / images[5]["file_name"]).write_bytes(b"not a jpeg")
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    assert prepare.prepare(tmp_path / "captions.json", val) == {"images": 7, "written": 6, "missing_images": 1}
    tmp, _, _, _ = trained
    result = run(eval_cfg(tmp_path, "eval=coco30k", f"ckpt={tmp}/run/checkpoints/last.ckpt", f"eval.split={val}",
                          "eval.num_captions=10", "eval.max_bad_fraction=0.5", "batch_size=4", "autocast=bf16",
                          f"metrics.extractor={TINY}", f"metrics.is_extractor={TINY_IS}", "metrics.is_splits=2"))
    m = result["splits"]["val2014"]
    assert m["n"] == 6 and m["real_skipped"] == 1  # all six pairs drawn; the corrupt image left out of the real side
    assert result["protocol"]["autocast"] == "bfloat16"  # sampling, decoding and extractors under CPU bf16 autocast
    assert {"fid", "is_mean", "is_std"} <= set(result["summary"]) and "clip_score" not in result["summary"]
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| model | fid | is_mean | is_std |" in md


# -- several processes ------------------------------------------------------------------------------
def _eval_rank(rank, world, port, cfgs, log):
    """One torchrun-like process: the environment torchrun sets, then t2i-eval's own run()."""
    import sys

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from t2i.cli.evaluate import run

    try:
        for cfg in cfgs:
            run(cfg)
    except BaseException:
        import traceback

        with open(f"{log}.{rank}", "w") as f:
            traceback.print_exc(file=f)
        sys.exit(1)


@pytest.mark.slow  # ~35 s on 2 cores, mostly two interpreters importing torch and Lightning
def test_t2i_eval_two_gloo_processes_equal_one(trained, codes, tmp_path):  # noqa: F811
    """t2i-eval under two processes (gloo, as torchrun starts them) gives the one-process numbers: FID, IS,
    CLIPScore, FD-CLIP, the oracle accuracies and the reconstruction metrics, with 10 captions in batches
    of 4 (rank 0 draws two batches, one of them short; rank 1 one) and 20 images in batches of 8; rank 0
    alone writes the outputs."""
    import socket

    import torch.multiprocessing as mp

    from t2i.cli.evaluate import run

    tmp, _, _, clip_ckpt = trained
    shapes = ["eval=shapes", f"ckpt={tmp}/run/checkpoints/last.ckpt", f"clip.ckpt={clip_ckpt}",
              "eval.splits=[test]", "eval.num_captions=10", "eval.num_candidates=2", "batch_size=4", f"metrics.extractor={TINY}",
              f"metrics.is_extractor={TINY_IS}", "metrics.is_splits=2"]
    recon = ["eval=reconstruction", f"tokenizer_ckpt={codes.parent / 'tok.ckpt'}", "eval.image_size=16",
             "eval.num_captions=20", "batch_size=8", f"metrics.extractor={TINY}", "metrics.lpips=false"]
    one = tmp_path / "one"
    single = [run(eval_cfg(one / "shapes", *shapes)), run(eval_cfg(one / "recon", *recon))]
    two = tmp_path / "two"
    cfgs = [eval_cfg(two / "shapes", *shapes), eval_cfg(two / "recon", *recon)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_eval_rank, args=(2, port, cfgs, str(tmp_path / "error")), nprocs=2)
    except Exception:
        pytest.fail("\n".join(p.read_text() for p in tmp_path.glob("error.*")))
    for want, name in zip(single, ("shapes", "recon")):
        got = json.loads((two / name / "out" / "metrics.json").read_text())
        assert got["protocol"]["processes"] == 2 and want["protocol"]["processes"] == 1
        assert set(got["splits"]) == set(want["splits"])
        for split, m in want["splits"].items():
            numbers = {k: v for k, v in m.items() if isinstance(v, (int, float, dict)) and k not in (
                "seconds", "extractors", "real_from_cache")}
            assert numbers and got["splits"][split]["n"] == m["n"]
            for k, v in numbers.items():
                assert got["splits"][split][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (name, split, k)
    s = single[0]["summary"]
    assert {"fid", "is_mean", "is_std", "clip_score", "fd_clip", "acc_first", "acc_rerank"} <= set(s)
    assert {"rfid", "psnr", "ssim"} <= set(single[1]["summary"])
    assert (two / "shapes" / "out" / "samples.png").is_file() and (two / "recon" / "out" / "reconstructions.png").is_file()
