"""Import OpenAI's DALL·E dVAE (the ``dall_e`` package's ``encoder.pkl`` / ``decoder.pkl``) into
:class:`t2i.models.dvae.DVAE`.

The released files are whole pickled modules (``torch.save`` of ``dall_e.Encoder`` / ``Decoder``
objects), not state dicts. :func:`load_openai_dvae` reads them without running code from them: an
inert unpickler rebuilds the tensors and replaces the ``dall_e`` classes by placeholders that only keep
each module's ``_parameters`` / ``_modules`` (see :mod:`t2i.pretrained._pickle`), so neither the
``dall_e`` package nor trust in the file is needed. If that fails (an unusual file), ``trust_pickle=True``
unpickles it fully, which imports the ``dall_e`` classes and can run arbitrary code.

:func:`save_openai_dvae_state` converts the pickles once into plain state-dict files (loadable with
``weights_only=True``); :func:`load_openai_dvae` accepts those too. Parameter names are identical on both
sides, so the configuration (``n_hid``, ``n_blk_per_group``, ``vocab_size``, ``group_count``,
``n_init``, channels) is read off the weight shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from t2i.errors import T2IError
from t2i.models.dvae import DVAE
from t2i.pretrained._pickle import module_state, read_weights, tensor_mapping


def _state(obj) -> dict[str, torch.Tensor] | None:
    state = tensor_mapping(obj)
    if state is None:
        state = module_state(obj)
    if state is not None and "blocks.input.w" not in state:  # e.g. a DVAE state dict: encoder.blocks...
        return None
    return state


def _read(path, what: str, trust_pickle: bool, map_location) -> dict[str, torch.Tensor]:
    state = read_weights(path, _state, what=f"dVAE {what} file", trust_pickle=trust_pickle,
                         map_location=map_location)
    return {k: v.detach().clone() for k, v in state.items()}


def _shape(state: dict, key: str, path, what: str) -> tuple[int, ...]:
    if key not in state:
        raise T2IError(f"dVAE {what} file {path}: no {key} (is it the dall_e {what}?)")
    return tuple(state[key].shape)


def _groups(state: dict) -> tuple[int, int]:
    groups = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    return len(groups), len(blocks)


def openai_dvae_config(encoder_state: dict, decoder_state: dict, encoder_path="encoder",
                       decoder_path="decoder") -> dict:
    """:class:`DVAE` constructor arguments read off the two state dicts (dall_e naming)."""
    e_in = _shape(encoder_state, "blocks.input.w", encoder_path, "encoder")
    d_in = _shape(decoder_state, "blocks.input.w", decoder_path, "decoder")
    if e_in[-1] == 1 and d_in[-1] == 7:
        raise T2IError(f"dVAE files swapped: {encoder_path} holds a decoder and {decoder_path} an encoder")
    if e_in[-1] != 7:
        raise T2IError(f"dVAE encoder file {encoder_path}: blocks.input.w has shape {e_in}, expected a 7x7 conv "
                       "(is it the dall_e encoder?)")
    if d_in[-1] != 1:
        raise T2IError(f"dVAE decoder file {decoder_path}: blocks.input.w has shape {d_in}, expected a 1x1 conv "
                       "(is it the dall_e decoder?)")
    e_out = _shape(encoder_state, "blocks.output.conv.w", encoder_path, "encoder")
    d_out = _shape(decoder_state, "blocks.output.conv.w", decoder_path, "decoder")
    group_count, n_blk = _groups(encoder_state)
    if (group_count, n_blk) != _groups(decoder_state):
        raise T2IError(f"dVAE {encoder_path} / {decoder_path}: encoder has {group_count} groups x {n_blk} blocks, "
                       f"decoder {_groups(decoder_state)}: not a pair")
    if e_out[0] != d_in[1]:
        raise T2IError(f"dVAE {encoder_path} / {decoder_path}: encoder vocabulary {e_out[0]} != decoder "
                       f"vocabulary {d_in[1]}: not a pair")
    if d_out[1] != e_in[0]:
        raise T2IError(f"dVAE {encoder_path} / {decoder_path}: encoder width {e_in[0]} != decoder width "
                       f"{d_out[1]}: not a pair")
    return dict(n_hid=e_in[0], n_blk_per_group=n_blk, vocab_size=e_out[0], group_count=group_count,
                input_channels=e_in[1], output_channels=d_out[0] // 2, n_init=d_in[0])


def _read_pair(encoder_path, decoder_path, trust_pickle, map_location):
    enc = _read(encoder_path, "encoder", trust_pickle, map_location)
    dec = _read(decoder_path, "decoder", trust_pickle, map_location)
    return enc, dec


def load_openai_dvae(encoder_path, decoder_path, *, trust_pickle: bool = False, map_location="cpu") -> DVAE:
    """OpenAI's dVAE as our :class:`DVAE` (eval mode), from the ``dall_e`` package's ``encoder.pkl`` and
    ``decoder.pkl`` (whole pickled modules; read without running their code, see the module docstring)
    or from the plain state-dict files :func:`save_openai_dvae_state` writes.

    ``model.encode(images)`` equals ``argmax(dall_e_encoder(map_pixels(images01)))`` and
    ``(model.decode(codes) + 1) / 2`` equals ``unmap_pixels(sigmoid(dall_e_decoder(one_hot)[:, :3]))``.
    """
    enc, dec = _read_pair(encoder_path, decoder_path, trust_pickle, map_location)
    model = DVAE(**openai_dvae_config(enc, dec, encoder_path, decoder_path))
    for part, state, path in ((model.encoder, enc, encoder_path), (model.decoder, dec, decoder_path)):
        try:
            part.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise T2IError(f"dVAE file {path} does not match the inferred architecture: {e}") from None
    return model.eval()


def save_openai_dvae_state(encoder_path, decoder_path, out_dir, *, trust_pickle: bool = False) -> tuple[Path, Path]:
    """Convert the ``dall_e`` pickles once into weights-only files ``out_dir/encoder.pt`` and
    ``out_dir/decoder.pt`` (plain ``{name: tensor}`` in dall_e naming, float32) and return their paths;
    :func:`load_openai_dvae` then reads them with ``torch.load(weights_only=True)``."""
    enc, dec = _read_pair(encoder_path, decoder_path, trust_pickle, "cpu")
    openai_dvae_config(enc, dec, encoder_path, decoder_path)  # validates the pair
    out = Path(str(out_dir)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "encoder.pt", out / "decoder.pt"
    for state, path in zip((enc, dec), paths):
        torch.save({k: v.float().contiguous() for k, v in state.items()}, path)
    return paths
