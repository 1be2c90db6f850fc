"""``t2i-import`` end to end: released files (built here with random weights in their own layouts) become
checkpoints that t2i-generate, t2i-eval and ``t2i-train init_from=`` read, with the text tokenizer inside."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from t2i.data.tokenizer import tokenizer_from_checkpoint
from t2i.errors import T2IError
from t2i.lit.transformer import TransformerModule
from t2i.pretrained.image_tokenizers import load_tokenizer
from tests.peers import mingpt_gpt, rudalle_module
from tests.test_artifacts import TAMING_DD, generate
from tests.test_import_transformers import randomize
from tests.test_pretrained import taming  # noqa: F401 (the fixture: taming.models.vqgan)

pytestmark = pytest.mark.compat
BERT_VOCAB = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/cn_clip/clip/vocab.txt"
CAPTIONS = ["一个大的红色圆形在左上角", "两只小猫 sitting on a Mat", "蓝色的正方形"]
T, N_EMBED = 8, 32  # text tokens; codes of the small taming VQGAN (16 px -> 4 x 4)


def import_cfg(*overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("import", overrides=list(overrides))


def run_import(*overrides) -> Path:
    from t2i.cli.importer import run

    source, *rest = overrides  # t2i-import <source> ...: the first bare word is the source
    return run(import_cfg(f"source={source}", *rest))


def bert_vocab() -> Path:
    if not BERT_VOCAB.is_file():
        pytest.skip("cn_clip's vocab.txt (the chinese-roberta-wwm-ext vocabulary) is not installed")
    return BERT_VOCAB


@pytest.fixture(scope="module")
def easynlp_release(tmp_path_factory, taming):  # noqa: F811
    """An EasyNLP pai-painter release at a small geometry: config.json + pytorch_model.bin (a random minGPT
    over 32 codes + the 21128 BERT ids, and a random taming VQModel as first_stage_model) + vocab.txt, as .tgz."""
    root = tmp_path_factory.mktemp("easynlp")
    vocab = bert_vocab()
    n_txt = sum(1 for _ in vocab.open(encoding="utf-8"))
    cfg = {"vocab_size": N_EMBED + n_txt, "img_vocab_size": N_EMBED, "text_vocab_size": n_txt, "block_size": T + 16,
           "n_layer": 2, "n_head": 2, "n_embd": 16, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0}
    torch.manual_seed(0)
    gpt = mingpt_gpt()(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=2, n_head=2, n_embd=16)
    gpt.head = torch.nn.Linear(16, N_EMBED, bias=False)
    randomize(gpt, 0)
    vq = taming.VQModel(ddconfig=TAMING_DD, n_embed=N_EMBED, embed_dim=8,
                        lossconfig={"target": "taming.modules.losses.vqperceptual.DummyLoss"})
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    folder = root / "artist_small"
    folder.mkdir()
    sd = {**{f"transformer.{k}": v for k, v in gpt.state_dict().items()},
          **{f"first_stage_model.{k}": v for k, v in vq.state_dict().items()}}
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "vocab.txt").write_bytes(vocab.read_bytes())
    OmegaConf.save(OmegaConf.create({"model": {"target": "taming.models.vqgan.VQModel",
                                               "params": {"ddconfig": TAMING_DD, "n_embed": N_EMBED, "embed_dim": 8}}}),
                   root / "vqgan.yaml")
    with tarfile.open(root / "artist_small.tgz", "w:gz") as tar:
        tar.add(folder, arcname="artist_small")
    return {"tgz": root / "artist_small.tgz", "folder": folder, "gpt": gpt.eval(), "vq": vq.eval(),
            "vqgan_config": root / "vqgan.yaml", "root": root}


@pytest.fixture(scope="module")
def easynlp_ckpt(easynlp_release):
    r = easynlp_release
    return run_import("easynlp", f"input={r['tgz']}", f"output={r['root']}/out/artist.ckpt", f"text_len={T}",
                      f"vqgan_config={r['vqgan_config']}")


def rebuild(ckpt_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module = TransformerModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return ckpt, module.model.eval()


def test_easynlp_import_equals_reference_from_caption_to_logits(easynlp_release, easynlp_ckpt):
    """Captions -> (BertTokenizer ids, +img_vocab, minGPT) equals captions -> (the checkpoint's tokenizer, our model)."""
    from transformers import BertTokenizer

    ckpt, model = rebuild(easynlp_ckpt)
    tok = tokenizer_from_checkpoint(ckpt)
    ref_tok = BertTokenizer(str(bert_vocab()), do_lower_case=True)
    ref = torch.zeros(len(CAPTIONS), T, dtype=torch.long)
    for i, c in enumerate(CAPTIONS):  # EasyNLP's data.py: tokenize, cut to text_len, pad with [PAD]
        ids = ref_tok.convert_tokens_to_ids(ref_tok.tokenize(c))[:T]
        ref[i, :len(ids)] = torch.tensor(ids)
    text = tok.encode(CAPTIONS, T)
    assert torch.equal(text, ref)
    image = torch.randint(0, N_EMBED, (len(CAPTIONS), 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = easynlp_release["gpt"](torch.cat([ref + N_EMBED, image], 1)[:, :-1])
        _, logits = model(text, image)
    torch.testing.assert_close(logits, expected[:, T - 1:], atol=1e-4, rtol=0)
    # the image tokenizer inside is the release's first stage: same codes as taming's VQModel
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    carried = load_tokenizer(easynlp_ckpt)
    with torch.no_grad():
        _, _, (_, _, ref_codes) = easynlp_release["vq"].encode(images)
    assert torch.equal(carried.encode(images).flatten(), ref_codes.flatten())
    assert ckpt["t2i_import"]["source"] == "easynlp" and len(ckpt["t2i_import"]["files"]["weights"]["sha256"]) == 64


def test_imported_checkpoint_generates_and_evaluates(easynlp_ckpt, tmp_path):
    from t2i.cli.evaluate import run as evaluate
    from tests.test_eval import eval_cfg

    files = generate(tmp_path, easynlp_ckpt)
    assert len(files) == 2
    from PIL import Image

    assert Image.open(files[0]).size == (16, 16)
    result = evaluate(eval_cfg(tmp_path / "eval", "eval=shapes", f"ckpt={easynlp_ckpt}", "eval.num_captions=4",
                               "eval.num_candidates=1", "batch_size=4", "metrics.extractor=null",
                               "metrics.inception_score=false", "metrics.clip_score=false", "metrics.fd_clip=false"))
    assert 0 <= result["summary"]["acc_first"] <= 1 and result["protocol"]["image_size"] == 16


def test_fine_tuning_an_imported_checkpoint_lowers_val_image_loss(easynlp_ckpt, tmp_path):
    """t2i-tokenize with the imported checkpoint's image tokenizer, then t2i-train init_from=: the
    architecture and both tokenizers come from the checkpoint, and Shapes val image loss goes down."""
    from t2i.cli.tokenize import run as tokenize
    from t2i.cli.train import train
    from tests.test_tokenize import SHAPES, tok_cfg
    from tests.test_transformer_train import compose_transformer

    shapes = [s.replace("n_train=40", "n_train=200").replace("n_val=8", "n_val=32") for s in SHAPES]
    tokenize(tok_cfg(tmp_path, f"tokenizer_ckpt={easynlp_ckpt}", f"output={tmp_path}/codes", *shapes))
    cfg = compose_transformer(tmp_path, tmp_path / "codes", f"init_from={easynlp_ckpt}", "trainer.max_steps=150",
                              "trainer.max_epochs=100", "data.batch_size=16", "model.lr=3e-3", "model.warmup_steps=10",
                              "data.num_workers=0", "test=false", "model.sample.num_captions=2")
    metrics, obj = train(cfg)
    model, dm, trainer = obj["model"], obj["datamodule"], obj["trainer"]
    assert model.hparams.model["text_pad"] == "shared" and model.hparams.model["n_layer"] == 2
    assert dm.tokenizer.fingerprint == tokenizer_from_checkpoint(torch.load(easynlp_ckpt, weights_only=True)).fingerprint
    _, before = rebuild(easynlp_ckpt)
    fresh = copy.deepcopy(model)  # the same module with the imported weights
    fresh.model.load_state_dict(before.state_dict())
    start = trainer.validate(fresh, datamodule=dm, verbose=False)[0]["val/image_loss"]
    end = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/image_loss"]
    assert end < start - 0.5, (start, end)


def test_easynlp_import_errors_name_the_file(easynlp_release, tmp_path):
    r = easynlp_release
    out = tmp_path / "x.ckpt"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((r["folder"] / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes((r["folder"] / "pytorch_model.bin").read_bytes()[:5000])  # truncated
    with pytest.raises(T2IError, match=r"EasyNLP weights .*bad/pytorch_model.bin cannot be read"):
        run_import("easynlp", f"input={bad}", f"output={out}", f"vocab={bert_vocab()}")
    sd = torch.load(r["folder"] / "pytorch_model.bin", weights_only=True)
    sd["transformer.ent_emb.weight"], sd["transformer.ent_emb.bias"] = torch.zeros(16, 100), torch.zeros(16)
    torch.save(sd, bad / "pytorch_model.bin")
    with pytest.raises(T2IError, match="ARTIST model with knowledge weights .* pass its entity files"):
        run_import("easynlp", f"input={bad}", f"output={out}", f"vocab={bert_vocab()}", f"text_len={T}",
                   f"vqgan_config={r['vqgan_config']}")
    sd = {k.replace("transformer.blocks.", "transformer.layers."): v for k, v in sd.items() if "ent_emb" not in k}
    torch.save(sd, bad / "pytorch_model.bin")  # a key set from another release
    with pytest.raises(T2IError, match=r"missing transformer.blocks.0.ln1.weight"):
        run_import("easynlp", f"input={bad}", f"output={out}", f"vocab={bert_vocab()}", f"text_len={T}",
                   f"vqgan_config={r['vqgan_config']}")
    assert not out.exists()


class Boom:  # a pickled object whose unpickling would run code
    def __reduce__(self):
        return (print, ("code from the file ran",))


def test_untrusted_pickle_is_not_executed(easynlp_release, tmp_path, capsys):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((easynlp_release["folder"] / "config.json").read_text())
    sd = torch.load(easynlp_release["folder"] / "pytorch_model.bin", weights_only=True)
    torch.save({"weights": sd, "extra": Boom()}, bad / "pytorch_model.bin")
    with pytest.raises(T2IError, match="trust_pickle"):
        run_import("easynlp", f"input={bad}", f"output={tmp_path}/x.ckpt", f"vocab={bert_vocab()}")
    assert "code from the file ran" not in capsys.readouterr().out


# -- ruDALL-E --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rudalle_release(tmp_path_factory, taming):  # noqa: F811
    """ruDALL-E's three files at a small geometry: a YouTokenToMe bpe.model trained here, a random DalleModel
    (v3) over its ids, and a random taming GumbelVQ in the Sber VQGAN's checkpoint layout."""
    yttm = pytest.importorskip("youtokentome")
    root = tmp_path_factory.mktemp("rudalle")
    words = ["красный", "круг", "квадрат", "синий", "большой", "маленький", "слева", "справа", "вверху", "внизу",
             "red", "circle", "square", "blue", "ёлка", "йогурт"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g)) for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    yttm.BPE.train(data=str(root / "corpus.txt"), model=str(root / "bpe.model"), vocab_size=120, n_threads=1)
    n_vocab = yttm.BPE(str(root / "bpe.model")).vocab_size()
    DalleModel = rudalle_module("rudalle.dalle.model").DalleModel
    torch.manual_seed(0)
    dalle = DalleModel(device="cpu", num_layers=2, vocab_size=n_vocab + T, hidden_size=16, num_attention_heads=2,
                       embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
                       text_seq_length=T, image_tokens_per_dim=4, image_vocab_size=N_EMBED,
                       cogview_sandwich_layernorm=True, cogview_pb_relax=True, is_bool_mask=True, hf_version="v3")
    randomize(dalle, 0)
    torch.save(dalle.state_dict(), root / "pytorch_model_v3.bin")
    params = {"ddconfig": TAMING_DD, "n_embed": N_EMBED, "embed_dim": TAMING_DD["z_channels"], "kl_weight": 1e-8,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    sched = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
             "params": {"warm_up_steps": 0, "max_decay_steps": 10, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}}
    vq = taming.GumbelVQ(temperature_scheduler_config=sched, **params)
    torch.save({"state_dict": vq.state_dict()}, root / "vqgan.ckpt")
    OmegaConf.save(OmegaConf.create({"model": {"target": "taming.models.vqgan.GumbelVQ", "params": params}}),
                   root / "vqgan.yaml")
    return {"root": root, "dalle": dalle.eval(), "bpe": root / "bpe.model", "vq": vq.eval(), "yttm": yttm}


def test_rudalle_import_equals_reference_from_caption_to_logits(rudalle_release, tmp_path):
    r = rudalle_release
    out = run_import("rudalle", f"input={r['root']}/pytorch_model_v3.bin", f"tokenizer={r['bpe']}",
                     f"vae={r['root']}/vqgan.ckpt", f"vae_config={r['root']}/vqgan.yaml", f"text_len={T}", "n_head=2",
                     f"output={tmp_path}/malevich.ckpt")
    ckpt, model = rebuild(out)
    tok = tokenizer_from_checkpoint(ckpt)
    captions = ["Красный КРУГ слева", "синий квадрат", "ёлка йогурт большой маленький красный круг вверху внизу",
                "\xa0синий круг\u3000", "\u2028Квадрат\u205f\u2003"]  # Unicode spaces: str.strip() drops them
    bpe = r["yttm"].BPE(str(r["bpe"]))
    ref = torch.zeros(len(captions), T, dtype=torch.long)
    for i, c in enumerate(captions):  # ruDALL-E's pipeline: lower(), encode, <BOS> ids <EOS>, pad with 0 / cut
        ids = ([2] + bpe.encode([c.lower().strip()], output_type=r["yttm"].OutputType.ID)[0] + [3])[:T]
        ref[i, :len(ids)] = torch.tensor(ids)
    text = tok.encode(captions, T)
    assert torch.equal(text, ref)
    image = torch.randint(0, N_EMBED, (len(captions), 16), generator=torch.Generator().manual_seed(0))
    seq = torch.cat([ref, image], 1)
    with torch.no_grad():
        expected, _ = r["dalle"](seq, torch.ones(1, 1, seq.shape[1], seq.shape[1]))
        text_logits, image_logits = model(text, image)
    vocab = model.text_vocab + T
    torch.testing.assert_close(image_logits, expected[:, T - 1:-1, vocab:], atol=1e-4, rtol=0)
    torch.testing.assert_close(text_logits, expected[:, :T - 1, :vocab], atol=1e-4, rtol=0)
    assert len(generate(tmp_path, out, "prompts=['красный круг']")) == 2
    with pytest.raises(T2IError, match="only ruDALL-E v3"):
        run_import("rudalle", f"input={r['root']}/pytorch_model_v3.bin", f"tokenizer={r['bpe']}",
                   f"vae={r['root']}/vqgan.ckpt", "version=v2", f"output={tmp_path}/v2.ckpt")


def test_tokenizer_sources_write_image_tokenizer_checkpoints(rudalle_release, tmp_path):
    """taming through the same front door: the output is an image-tokenizer checkpoint load_tokenizer reads."""
    r = rudalle_release
    out = run_import("taming", f"input={r['root']}/vqgan.ckpt", f"config={r['root']}/vqgan.yaml",
                     f"output={tmp_path}/vq.ckpt")
    tok = load_tokenizer(out)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logits = r["vq"].quantize.proj(r["vq"].quant_conv(r["vq"].encoder(images)))
    assert torch.equal(tok.encode(images).flatten(), logits.argmax(1).flatten())  # the deterministic tokenization


def test_realesrgan_through_the_front_door(tmp_path):
    from t2i.models.rrdbnet import RRDBNet
    from t2i.pretrained.realesrgan import load_sr

    torch.manual_seed(0)
    net = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "RealESRGAN_x2.pth")
    out = run_import("realesrgan", f"input={tmp_path}/RealESRGAN_x2.pth", f"output={tmp_path}/sr.ckpt")
    loaded = load_sr(out)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x)) and loaded(x).shape[-1] == 16
    with pytest.raises(T2IError, match="RealESRGAN_x2.pth"):
        run_import("realesrgan", f"input={tmp_path}/RealESRGAN_x2.pth", "scale=4", f"output={tmp_path}/sr4.ckpt")


def test_artist_knowledge_model_imports_with_its_entity_files(easynlp_release, tmp_path):
    """ARTIST = pai-painter + ``transformer.ent_emb`` (Linear(100, d)) + entity2id.txt / entity2vec.pt: imported
    with fusion=easynlp, its logits equal EasyNLP's formula on top of minGPT for a caption with linked entities."""
    from t2i.knowledge.prompts import checkpoint_linker

    r = easynlp_release
    folder = tmp_path / "artist"
    folder.mkdir()
    for name in ("config.json", "vocab.txt"):
        (folder / name).write_bytes((r["folder"] / name).read_bytes())
    sd = torch.load(r["folder"] / "pytorch_model.bin", weights_only=True)
    g = torch.Generator().manual_seed(3)
    ent = torch.nn.Linear(100, 16)
    with torch.no_grad():
        ent.weight.copy_(torch.randn(16, 100, generator=g) * 0.1)
        ent.bias.copy_(torch.randn(16, generator=g) * 0.1)
    sd.update({"transformer.ent_emb.weight": ent.weight.detach(), "transformer.ent_emb.bias": ent.bias.detach()})
    torch.save(sd, folder / "pytorch_model.bin")
    names = ["红色", "圆形", "红色圆形", "左上角", "猫"]  # "猫" (one character) is dropped, as EasyNLP does
    (folder / "entity2id.txt").write_text("5\n" + "".join(f"{n}\t{i}\n" for i, n in enumerate(names)), encoding="utf-8")
    table = torch.randn(5, 100, generator=g)
    torch.save(table, folder / "entity2vec.pt")
    with pytest.raises(T2IError, match="entities=<entity2id.txt> vectors=<entity2vec.pt>"):
        run_import("easynlp", f"input={folder}", f"output={tmp_path}/no.ckpt", f"text_len={T}",
                   f"vqgan_config={r['vqgan_config']}")
    out = run_import("easynlp", f"input={folder}", f"output={tmp_path}/artist.ckpt", f"text_len={T}",
                     f"vqgan_config={r['vqgan_config']}", f"entities={folder}/entity2id.txt",
                     f"vectors={folder}/entity2vec.pt")
    ckpt, model = rebuild(out)
    assert model.knowledge.fusion == "easynlp" and ckpt["t2i_import"]["source"] == "artist"
    tok = tokenizer_from_checkpoint(ckpt)
    linker = checkpoint_linker(ckpt, model, tok)
    prompts = ["红色圆形在左上角", "蓝色的正方形"]
    ids, spans = linker(prompts)
    assert ids[0].tolist()[:4] == [2, 3, 0, 1] and ids[1].tolist() == [-1] * 10  # longest first
    text = tok.encode(prompts, T)
    image = torch.randint(0, N_EMBED, (2, 16), generator=g)
    gpt = r["gpt"]
    with torch.no_grad():
        idx = torch.cat([text + N_EMBED, image], 1)[:, :-1]
        x = gpt.blocks(gpt.tok_emb(idx) + gpt.pos_emb[:, :idx.shape[1]])
        words = torch.zeros(2, 10, T, 100)  # EasyNLP's words_emb: the vector where the entity is, zeros elsewhere
        for b in range(2):
            for e in range(10):
                if ids[b, e] >= 0:
                    words[b, e, spans[b, e, 0]:spans[b, e, 1]] = table[ids[b, e]]
        maps = ent(words)
        w = (x[:, None, :T].reshape(2, 1, -1) @ maps.reshape(2, 10, -1).transpose(1, 2)).squeeze(1)
        w = w.masked_fill(ids < 0, float("-inf")).softmax(-1).nan_to_num(0.0)  # padded slots: no weight (see docs)
        x = torch.cat([x[:, :T] + (w[:, :, None, None] * maps).sum(1), x[:, T:]], 1)
        expected = gpt.head(gpt.ln_f(x))[:, T - 1:]
        _, logits = model(text, image, (ids, spans))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(logits[0, 0], model(text, image)[1][0, 0])  # the entities change the first code


def test_sber_vqgan_equals_rudalles_vae(taming, monkeypatch):  # noqa: F811
    """ruDALL-E's VQGanGumbelVAE (its own GumbelVQ wrapper: [0, 1] images, argmax codes with the gumbel noise off,
    one-hot decoding) against our VQGAN loaded from the same state dict, at a small geometry."""
    import sys
    import types

    from t2i.models.vqgan import VQGAN
    from t2i.pretrained.export import check_state
    from t2i.pretrained.taming import taming_vqgan_config

    monkeypatch.setitem(sys.modules, "pywt", types.ModuleType("pywt"))  # only its DWT decoder needs PyWavelets
    vae_mod = rudalle_module("rudalle.vae.model")
    params = {"ddconfig": {**TAMING_DD, "attn_resolutions": [4]}, "n_embed": N_EMBED,
              "embed_dim": TAMING_DD["z_channels"], "kl_weight": 1e-8}
    config = OmegaConf.create({"model": {"target": "taming.models.vqgan.GumbelVQ", "params": params}})
    torch.manual_seed(0)
    ref = vae_mod.VQGanGumbelVAE(config).eval()
    randomize(ref.model, 5)
    ours = VQGAN(**taming_vqgan_config(config))
    check_state(ours, ref.model.state_dict(), "test")
    ours.eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref_codes = ref.get_codebook_indices(images, disable_gumbel_softmax=True)
        codes = ours.encode(images * 2 - 1).flatten(1)
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close((ours.decode(codes.view(2, 4, 4)).clamp(-1, 1) + 1) / 2, ref.decode(ref_codes),
                                   atol=1e-5, rtol=0)
