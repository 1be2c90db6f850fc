"""Super-resolution (issue 18): our RRDBNet equals rudalle's Real-ESRGAN RRDBNet with the same random
weights at every scale it builds (1, 2, 4, 8); Real-ESRGAN files (params_ema / params / bare) load
strictly with the geometry read from the shapes, and a mismatch is one error naming the file and keys;
tiled upscaling equals untiled; t2i-generate with sr.ckpt writes images `scale` times larger."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i.errors import ConfigError, T2IError
from t2i.models.rrdbnet import RRDBNet, upscale
from t2i.pretrained.realesrgan import import_realesrgan, load_realesrgan, load_sr, save_sr_checkpoint

SMALL = dict(num_feat=16, num_block=2, num_grow_ch=8)
RUDALLE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / "rudalle"


@pytest.fixture(scope="module")
def reference():
    """rudalle.realesrgan.rrdbnet_arch without running rudalle's package __init__ files (they import a
    removed huggingface_hub API): stub packages whose __path__ is the installed folder."""
    import importlib.util

    spec = importlib.util.find_spec("rudalle") if "rudalle" not in sys.modules else None
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else RUDALLE
    for name, path in (("rudalle", root), ("rudalle.realesrgan", root / "realesrgan")):
        if name not in sys.modules:
            if not path.is_dir():
                pytest.skip("rudalle is not installed")
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
    from rudalle.realesrgan import rrdbnet_arch

    return rrdbnet_arch


def reference_net(reference, scale: int, seed: int = 0, **geometry):
    torch.manual_seed(seed)
    net = reference.RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **{**SMALL, **geometry}).eval()
    with torch.no_grad():  # zero biases in its init: randomise them too, so they are checked
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_equals_rudalle_rrdbnet(reference, scale):
    ref = reference_net(reference, scale)
    ours = RRDBNet(3, 3, scale=scale, **SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same parameter names
    x = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (2, 3, 12 * scale, 16 * scale) == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["params_ema", "params", "bare"])
@pytest.mark.parametrize("scale", [2, 8])
def test_loads_realesrgan_files_with_geometry_from_shapes(reference, tmp_path, layout, scale):
    ref = reference_net(reference, scale, num_block=3)
    state = ref.state_dict()
    path = tmp_path / f"RealESRGAN_x{scale}.pth"
    if layout == "params_ema":  # the EMA weights win over `params`, as in Real-ESRGAN's own loader
        noise = {k: torch.randn_like(v) for k, v in state.items()}
        torch.save({"params_ema": state, "params": noise}, path)
    else:
        torch.save({"params": state} if layout == "params" else state, path)
    model = load_realesrgan(path)
    assert model.config == dict(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=16, num_block=3, num_grow_ch=8)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-5
    # our own weights-only form round-trips, and load_sr reads both kinds
    ours = import_realesrgan(path, tmp_path / "sr" / "x.pt")
    raw = torch.load(ours, map_location="cpu", weights_only=True)
    assert raw["t2i_sr"]["target"] == "t2i.models.rrdbnet.RRDBNet" and raw["t2i_sr"]["config"] == model.config
    for p in (path, ours):
        again = load_sr(p)
        assert again.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_strict_load_error_names_file_and_keys(reference, tmp_path):
    state = reference_net(reference, 4).state_dict()
    path = tmp_path / "bad.pth"
    torch.save({"params_ema": {**state, "extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(T2IError) as e:
        load_realesrgan(path)
    msg = str(e.value)
    assert str(path) in msg and "1 unexpected: extra.weight" in msg and "\n" not in msg
    del state["body.1.rdb3.conv5.bias"]
    torch.save({"params_ema": state}, path)
    with pytest.raises(T2IError, match=r"bad\.pth.*1 missing: body\.1\.rdb3\.conv5\.bias"):
        load_realesrgan(path)
    # a x4 file read as x8 (conv_up3 missing) and as x2 (conv_first reads 12 channels)
    torch.save({"params_ema": reference_net(reference, 4).state_dict()}, path)
    with pytest.raises(T2IError, match=r"bad\.pth.*scale=8.*2 missing: conv_up3\.weight, conv_up3\.bias"):
        load_realesrgan(path, scale=8)
    with pytest.raises(T2IError, match=r"wrong shape: conv_first\.weight \(file \[16, 3, 3, 3\], model \[16, 12, 3"):
        load_realesrgan(path, scale=2)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(T2IError, match=r"Real-ESRGAN weights .*junk\.pth cannot be read"):
        load_realesrgan(tmp_path / "junk.pth")


def test_a_pickled_module_is_read_without_running_it(reference, tmp_path):
    """A whole pickled rudalle RRDBNet (not a state dict): the inert unpickler reads its parameters, nothing
    the pickle names is imported (rudalle's classes become placeholders)."""
    ref = reference_net(reference, 8)
    torch.save(ref, tmp_path / "module.pth")
    with pytest.raises(Exception, match="Weights only load failed"):  # it names classes: not a plain tensor file
        torch.load(tmp_path / "module.pth", weights_only=True)
    model = load_realesrgan(tmp_path / "module.pth")
    assert model.scale == 8
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("scale, geometry", [(4, dict(num_block=1, num_feat=8)), (2, dict(num_block=1, num_feat=8))])
def test_tiled_equals_untiled(reference, scale, geometry):
    model = RRDBNet(3, 3, scale=scale, **{**SMALL, **geometry}).eval()
    model.load_state_dict(reference_net(reference, scale, **geometry).state_dict())
    r = model.receptive_radius
    # the middle column of tiles sees neither side edge (width > tile + 2 r); odd sizes: the x2 model pads to even
    size = (45, 3 * r + 24) if scale == 4 else (r + 3, 3 * r + 9)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    whole = upscale(model, x)
    assert whole.shape == (2, 3, size[0] * scale, size[1] * scale)
    tiled = upscale(model, x, tile=24 if scale == 4 else 32, tile_pad=r)
    assert (tiled - whole).abs().max().item() <= 1e-5
    if scale == 4:
        with torch.no_grad():
            assert (whole - model(x)).abs().max().item() == 0  # untiled is a plain forward
        short = upscale(model, x, tile=24, tile_pad=2)  # too little context: seams differ
        assert (short - whole).abs().max().item() > 1e-4


# -- t2i-generate sr.* ------------------------------------------------------------------------------------
@pytest.fixture
def tiny_transformer(tmp_path) -> Path:
    """A random tiny transformer checkpoint as t2i-train writes it (hyper-parameters, state dict, the text
    tokenizer in a datamodule entry, the image tokenizer record): a PoolTokenizer, 8 px images of 2x2 codes."""
    from t2i.data.tokenizer import TextTokenizer
    from t2i.lit.transformer import TransformerModule
    from tests.toy_tokenizer import save_checkpoint

    save_checkpoint(tmp_path / "tok.ckpt", downsample=4, levels=2)
    tok = TextTokenizer.train(["a red circle", "a blue square"] * 3, vocab_size=40)
    torch.manual_seed(0)
    module = TransformerModule(model=dict(text_vocab=tok.vocab_size, text_pad_id=0, image_vocab=8, image_grid=[2, 2],
                                          text_len=4, n_layer=1, n_head=2, d_model=16),
                               image_tokenizer=str(tmp_path / "tok.ckpt"))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "datamodule": {"tokenizer": tok.to_str()}}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "t2i.ckpt")
    return tmp_path / "t2i.ckpt"


def test_generate_upscales_written_images(tiny_transformer, tmp_path):
    from t2i.cli.generate import run
    from tests.test_generate import generate_cfg

    model = RRDBNet(3, 3, scale=4, num_feat=8, num_block=1, num_grow_ch=4)
    save_sr_checkpoint(model, tmp_path / "sr.pt")
    torch.save({"params_ema": RRDBNet(3, 3, scale=2, num_feat=8, num_block=1, num_grow_ch=4).state_dict()},
               tmp_path / "x2.pth")
    base = [f"ckpt={tiny_transformer}", "prompts=['a red circle']", "num_samples=2", "batch_size=2", "device=cpu"]
    run(generate_cfg(tmp_path / "plain", *base))
    plain = Image.open(tmp_path / "plain" / "gen" / "p000_s00.png")
    for sr, cfg in [(tmp_path / "sr.pt", ["sr.tile=4", "sr.tile_pad=2"]), (tmp_path / "x2.pth", ["sr.scale=2"])]:
        out = tmp_path / sr.stem
        run(generate_cfg(out, *base, f"sr.ckpt={sr}", *cfg))
        scale = 4 if sr.stem == "sr" else 2
        for j in range(2):
            im = Image.open(out / "gen" / f"p000_s{j:02d}.png")
            assert im.size == (plain.size[0] * scale, plain.size[1] * scale)
        rows = [json.loads(line) for line in (out / "gen" / "samples.jsonl").read_text().splitlines()]
        assert [r["sr"] for r in rows] == [{"file": str(sr), "scale": scale}] * 2
    rows = [json.loads(line) for line in (tmp_path / "plain" / "gen" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["sr"] is None


@pytest.mark.parametrize("override, message", [
    ("sr.ckpt={tmp}/missing.pth", r"sr\.ckpt=.*missing\.pth: no such file"),
    ("sr.scale=8", r"sr\.scale=8, but sr\.ckpt=.*x2\.pth holds x2 weights .*set sr\.scale=2 or null"),
    ("sr.scale=3", r"sr\.scale=3 must be 1, 2, 4 or 8"),
    ("sr.tile=-1", r"sr\.tile=-1 must be an integer >= 0"),
])
def test_generate_sr_errors(tiny_transformer, tmp_path, override, message):
    from t2i.cli.generate import run
    from tests.test_generate import generate_cfg

    torch.save({"params_ema": RRDBNet(3, 3, scale=2, num_feat=8, num_block=1, num_grow_ch=4).state_dict()},
               tmp_path / "x2.pth")
    cfg = generate_cfg(tmp_path, f"ckpt={tiny_transformer}", "prompts=['a red circle']", "num_samples=1",
                       "device=cpu", f"sr.ckpt={tmp_path}/x2.pth", override.format(tmp=tmp_path))
    with pytest.raises(ConfigError, match=message):
        run(cfg)


def test_generate_missing_sr_file_fails_before_the_model_loads(tmp_path):
    from t2i.cli.generate import run
    from tests.test_generate import generate_cfg

    cfg = generate_cfg(tmp_path, f"ckpt={tmp_path}/missing.ckpt", "prompts=['a']", f"sr.ckpt={tmp_path}/x4.pth")
    with pytest.raises(ConfigError, match=r"^sr\.ckpt=.*x4\.pth: no such file"):
        run(cfg)
