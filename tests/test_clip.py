"""CLIP reranker: the contrastive loss against open_clip's ClipLoss (one process and two gloo ranks),
retrieval recall, the model, CLIPModule training on Shapes and reranking."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module

from t2i.cli.train import train
from t2i.errors import ConfigError
from t2i.lit.clip import CLIPModule, retrieval_recall
from t2i.losses.clip import ContrastiveLoss
from t2i.models.clip import CLIP
from t2i.pipeline.rerank import load_reranker, rerank, score


def features(seed, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def both_losses(img, txt, local_loss, rank=0, world_size=1):
    """(ours, open_clip's) loss and gradients on the same features."""
    from open_clip.loss import ClipLoss

    scale = torch.tensor(14.0)
    ours = ContrastiveLoss(local_loss)(img, txt, scale)
    g_ours = torch.autograd.grad(ours, (img, txt))
    ref_fn = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
    ref = ref_fn(img, txt, scale)
    g_ref = torch.autograd.grad(ref, (img, txt))
    return ours, ref, g_ours, g_ref


@pytest.mark.parametrize("local_loss", [False, True])
def test_loss_matches_open_clip_single_process(local_loss):
    pytest.importorskip("open_clip")
    ours, ref, g_ours, g_ref = both_losses(*features(0), local_loss)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_ref))
    # hand check: identical pairs with a large scale give a near-zero loss
    x = torch.eye(4)
    assert ContrastiveLoss()(x, x, torch.tensor(100.0)).item() < 1e-6


def _rank(rank, world_size, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for local_loss in (False, True):
            ours, ref, g_ours, g_ref = both_losses(*features(rank), local_loss, rank, world_size)
            results[local_loss] = (ours.item(), ref.item(), [g.tolist() for g in g_ours], [g.tolist() for g in g_ref])
        out[rank] = results
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loss_matches_open_clip_across_two_gloo_ranks():
    pytest.importorskip("open_clip")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, 2, port, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs)
        out = dict(out)
    for rank in range(2):
        for local_loss, (ours, ref, g_ours, g_ref) in out[rank].items():
            assert abs(ours - ref) < 1e-6, (rank, local_loss)
            assert torch.allclose(torch.tensor(g_ours), torch.tensor(g_ref), atol=1e-6)
    # negatives really come from the other rank: the gathered loss differs from a local-only one
    single = ContrastiveLoss()(*features(0), torch.tensor(14.0)).item()
    assert abs(out[0][False][0] - single) > 1e-4


def test_retrieval_recall_by_hand():
    # 3 images (keys a, b, c); a has two captions
    img = torch.eye(3)
    image = img[[0, 0, 1, 2]]
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 0.9, 0.1]])
    text = torch.nn.functional.normalize(text, dim=-1)
    r = retrieval_recall(image, text, ["a", "a", "b", "c"])
    # texts: a->a (rank 0), a's 2nd caption -> c first (rank 1), b->b (0), c's caption -> b first (rank 1)
    assert r["t2i_R@1"] == pytest.approx(0.5) and r["t2i_R@5"] == 1.0
    # images: a: its caption 0 is best; b: its caption (0.99 for b) beats others; c: best text is "a#2" (1.0)
    assert r["i2t_R@1"] == pytest.approx(2 / 3)


def test_clip_model_shapes_and_padding():
    torch.manual_seed(0)
    for encoder in ("vit", "resnet"):
        m = CLIP(vocab_size=50, text_len=6, pad_id=0, image_size=16, embed_dim=8, image_encoder=encoder, patch_size=4,
                 vision_width=16, vision_layers=2, vision_heads=2, text_width=16, text_layers=1, text_heads=2).eval()
        img = torch.rand(3, 3, 16, 16) * 2 - 1
        ids = torch.tensor([[5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
        fi, ft = m.encode_image(img), m.encode_text(ids)
        assert fi.shape == ft.shape == (3, 8)
        assert torch.allclose(fi.norm(dim=-1), torch.ones(3)) and torch.allclose(ft.norm(dim=-1), torch.ones(3))
        # pads are masked: a shorter padded copy encodes the same
        assert torch.allclose(m.encode_text(ids[:, :3]), ft, atol=1e-5)
        assert m.score(img, ids).shape == (3,) and m.logits(img, ids).shape == (3, 3)
        assert m.encode_image(torch.rand(1, 3, 24, 24)).shape == (1, 8)  # other sizes are resized


def test_clip_math_attention_equals_sdpa():
    torch.manual_seed(0)
    kw = dict(vocab_size=50, text_len=6, pad_id=0, image_size=16, embed_dim=8, patch_size=4, vision_width=16,
              vision_layers=2, vision_heads=2, text_width=16, text_layers=2, text_heads=2)
    a, b = CLIP(**kw).eval(), CLIP(**kw, attn_impl="math").eval()
    b.load_state_dict(a.state_dict())
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = torch.tensor([[5, 6, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12], [0, 0, 0, 0, 0, 0]])  # pads, full, empty
    assert torch.allclose(a.logits(img, ids), b.logits(img, ids), atol=1e-5)
    with pytest.raises(ConfigError, match="attn_impl='flex'"):
        CLIP(**kw, attn_impl="flex")


def compose_clip(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("train", overrides=[
            "experiment=shapes_clip", "logger=csv", f"paths.output_dir={tmp_path}/run",
            f"paths.data_dir={tmp_path}/data", "data.image_size=16", "data.shapes.n_train=512",
            "data.shapes.n_val=32", "data.shapes.n_test=32", "data.shapes.n_compositional=4", "data.num_workers=0",
            "data.batch_size=32", "model.model.vision_layers=1", "model.model.text_layers=1",
            "model.model.vision_width=32", "model.model.text_width=32", "model.model.embed_dim=32",
            "callbacks.rich_summary=null", "trainer.enable_progress_bar=false", *overrides])


def test_shapes_clip_trains_and_reranks(tmp_path):
    metrics, obj = train(compose_clip(tmp_path, "trainer.max_epochs=8", "model.warmup_steps=5"))
    assert {"val/t2i_R@1", "val/i2t_R@10", "test/t2i_R@5", "train/logit_scale"} <= set(metrics)
    assert metrics["val/t2i_R@5"] > 5 / 32  # better than chance among 32 validation images
    assert metrics["train/loss"] < 0.8 * torch.log(torch.tensor(32.0)).item()  # below chance level
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    assert CLIPModule.load_from_checkpoint(ckpt).model is not None  # sizes travel with the checkpoint
    clip = load_reranker(ckpt)
    dm = obj["datamodule"]
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    images, captions = batch["image"], batch["caption"]
    s = score(clip, images, captions, batch_size=7)  # batched in uneven chunks
    assert s.shape == (len(captions),)
    assert torch.allclose(s, clip.score(images, captions), atol=1e-5)
    order, top = rerank(clip, images, captions[0], top=3)
    assert order.shape == (3,) and torch.all(top[:-1] >= top[1:])
    assert torch.allclose(top, score(clip, images[order], captions[0]), atol=1e-5)
    assert list(Path(tmp_path / "run" / "images").glob("val_epoch*_retrieval.png"))


def test_load_reranker_errors(tmp_path):
    from t2i.errors import T2IError

    with pytest.raises(T2IError, match="no such file"):
        load_reranker(tmp_path / "none.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(T2IError, match="cannot be read"):
        load_reranker(bad)


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def test_open_clip_backend_scores_like_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    import json

    from t2i.errors import T2IError

    (tmp_path / "t2i-tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "t2i-tiny.json")  # a small architecture, registered like theirs
    torch.manual_seed(0)
    ref = open_clip.create_model("t2i-tiny").eval()  # random weights, saved like a downloaded checkpoint
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    clip = load_reranker(path, backend="open_clip", model_name="t2i-tiny")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    texts = ["a red circle", "a blue square", "a green triangle"]
    tok = open_clip.get_tokenizer("t2i-tiny")
    with torch.no_grad():  # open_clip itself, on its own normalisation of [0, 1] pixels
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        fi = ref.encode_image(((images + 1) / 2 - mean) / std, normalize=True)
        ft = ref.encode_text(tok(texts), normalize=True)
    assert torch.allclose(score(clip, images, texts), (fi * ft).sum(-1), atol=1e-5)
    assert score(clip, torch.rand(2, 3, 48, 64) * 2 - 1, "x").shape == (2,)  # other sizes: resize + crop
    with pytest.raises(T2IError, match="no such file"):
        load_reranker(tmp_path / "missing.pt", backend="open_clip", model_name="t2i-tiny")
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        load_reranker(path, backend="open_clip", model_name="no-such-model")
    with pytest.raises(ConfigError, match="unknown"):
        load_reranker(path, backend="nope")


@pytest.mark.parametrize("h,w", [(48, 64), (45, 70), (32, 35), (100, 37), (64, 40)])
def test_open_clip_preprocessing_equals_open_clip_on_non_square_images(tmp_path, h, w):
    """Resize / crop geometry as open_clip's own eval transform: the long side truncated (48x64 -> 32x42,
    45x70 -> 32x49), the crop offset rounded (32x35 starts at column 2); against its transform on the
    same float tensors (exact) and on PIL images of the same pixels (PIL's uint8 resampling)."""
    open_clip = pytest.importorskip("open_clip")
    import json

    from PIL import Image

    (tmp_path / "t2i-tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "t2i-tiny.json")
    torch.manual_seed(1)
    ref = open_clip.create_model("t2i-tiny").eval()
    torch.save(ref.state_dict(), tmp_path / "tiny.pt")
    clip = load_reranker(tmp_path / "tiny.pt", backend="open_clip", model_name="t2i-tiny")
    transform = open_clip.image_transform(32, is_train=False, mean=clip.mean, std=clip.std)
    tok = open_clip.get_tokenizer("t2i-tiny")
    pixels = torch.randint(0, 256, (3, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    texts = ["a red circle", "a blue square", "a green triangle"]
    with torch.no_grad():
        ft = ref.encode_text(tok(texts), normalize=True)
        on_tensors = (ref.encode_image(transform((images + 1) / 2), normalize=True) * ft).sum(-1)
        x = torch.stack([transform(Image.fromarray(p.numpy())) for p in pixels])
        on_pil = (ref.encode_image(x, normalize=True) * ft).sum(-1)
    ours = score(clip, images, texts)
    assert torch.allclose(ours, on_tensors, atol=1e-6)
    assert torch.allclose(ours, on_pil, atol=2e-3)


TINY_CN_CLIP = {  # cn_clip's CLIP kwargs: a 2-layer ViT and a 2-layer BERT over its Chinese vocabulary
    "embed_dim": 32, "image_resolution": 32, "vision_layers": 2, "vision_width": 64, "vision_patch_size": 8,
    "vision_head_width": 32, "vocab_size": 21128, "text_attention_probs_dropout_prob": 0.0,
    "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.0, "text_hidden_size": 64,
    "text_initializer_range": 0.02, "text_intermediate_size": 128, "text_max_position_embeddings": 64,
    "text_num_attention_heads": 2, "text_num_hidden_layers": 2, "text_type_vocab_size": 2,
}


def test_cn_clip_backend_scores_like_cn_clip(tmp_path):
    pytest.importorskip("cn_clip")
    import json

    from cn_clip.clip import image_transform, tokenize
    from cn_clip.clip.model import CLIP as CNCLIP
    from PIL import Image

    from t2i.errors import ConfigError, T2IError

    arch = tmp_path / "tiny-cn.json"
    arch.write_text(json.dumps(TINY_CN_CLIP))
    torch.manual_seed(0)
    ref = CNCLIP(**TINY_CN_CLIP).eval()  # random weights, saved the way Chinese-CLIP saves its checkpoints
    path = tmp_path / "clip_cn_tiny.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    clip = load_reranker(path, backend="cn_clip", model_name=str(arch))
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    texts = ["一个红色的圆形", "一个蓝色的正方形", "a green triangle"]
    with torch.no_grad():  # Chinese-CLIP itself: its PIL transform and tokenizer
        tf = image_transform(32)
        x = torch.stack([tf(Image.fromarray(p.numpy())) for p in pixels])
        fi, ft, _ = ref(x, tokenize(texts))
    assert torch.allclose(score(clip, images, texts), (fi * ft).sum(-1), atol=1e-4)
    assert score(clip, torch.rand(2, 3, 48, 64) * 2 - 1, "一只猫").shape == (2,)  # other sizes: resized
    with pytest.raises(T2IError, match="no such file.*huggingface.co/OFA-Sys"):
        load_reranker(tmp_path / "missing.pt", backend="cn_clip", model_name="ViT-B-16")
    with pytest.raises(T2IError, match="does not fit"):
        load_reranker(path, backend="cn_clip", model_name="RN50")
    with pytest.raises(ConfigError, match="not a Chinese-CLIP model"):
        load_reranker(path, backend="cn_clip", model_name="ViT-B-32-openai")
    with pytest.raises(ConfigError, match="needs rerank.model_name"):
        load_reranker(path, backend="cn_clip")
