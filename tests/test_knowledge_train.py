"""experiment=shapes_kg_transformer through t2i-tokenize and t2i-train: captions linked by the data layer, vectors
from a file, EMA and caption dropout on; the checkpoint carries the lexicon; knowledge off is the same config."""

from __future__ import annotations

import pytest
import torch

from t2i.cli.train import train
from t2i.data import shapes_kg as K
from t2i.knowledge.lexicon import EntityLexicon
from t2i.knowledge.vectors import save_vectors
from tests.test_transformer_train import compose_transformer
from tests.toy_tokenizer import save_checkpoint


@pytest.fixture(scope="module")
def kg_codes(tmp_path_factory):
    from t2i.cli.tokenize import run as tokenize
    from t2i.data.tokenizer import train_tokenizer
    from tests.test_tokenize import tok_cfg

    root = tmp_path_factory.mktemp("kgtrain")
    data = root / "data" / "shapes_kg_16_zh"
    paths = K.write_shapes_kg(data, n_train=96, n_val=16, n_test=16, n_kg_heldout=16, image_size=16, progress=False)
    train_tokenizer([paths[f"{s}_tsv"] for s in K.SPLITS] + [paths["object_names"]], data / "tokenizer.json",
                    vocab_size=300)
    lexicon = EntityLexicon.from_file(data / "entity2id.txt")
    save_vectors(torch.randn(lexicon.num_ids, 8, generator=torch.Generator().manual_seed(0)), data / "vectors.pt")
    ckpt = root / "tok.ckpt"
    save_checkpoint(ckpt, downsample=4, levels=4)
    tokenize(tok_cfg(root, f"tokenizer_ckpt={ckpt}", "data=shapes_kg", "data.image_size=16", f"output={root}/codes"))
    return root, data, lexicon


def kg_cfg(root, data, run, *overrides):
    return compose_transformer(run, root / "codes", "experiment=shapes_kg_transformer", f"kg_dir={data}",
                               f"model.knowledge.vectors={data}/vectors.pt", "data.batch_size=16",
                               "trainer.max_epochs=1", "model.warmup_steps=1", "model.model.n_layer=1",
                               "model.model.d_model=32", "model.sample.num_captions=4", "model.ema_decay=0.9",
                               "model.cond_drop_prob=0.3", "trainer.precision=32-true", "test=false", *overrides)


def test_knowledge_trains_and_the_checkpoint_carries_the_lexicon(kg_codes, tmp_path):
    root, data, lexicon = kg_codes
    metrics, obj = train(kg_cfg(root, data, tmp_path))
    module = obj["model"]
    assert module.model.knowledge is not None and module.ema.knowledge is not None
    assert module.model.knowledge.table.shape == (lexicon.num_ids, 8)
    assert torch.isfinite(torch.tensor(metrics["val/image_loss"]))
    assert float(module.model.knowledge.gate) != 0.0  # the gate opened: gradient reached the knowledge path
    batch = next(iter(obj["datamodule"].train_dataloader()))
    assert batch["entities"].shape == (16, 4) and (batch["entities"] >= 0).any()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert EntityLexicon.from_str(ckpt["t2i_entity_lexicon"]).fingerprint == lexicon.fingerprint
    assert ckpt["hyper_parameters"]["model"]["knowledge"]["num_entities"] == lexicon.num_ids


def test_knowledge_off_is_one_override(kg_codes, tmp_path):
    root, data, _ = kg_codes
    _, obj = train(kg_cfg(root, data, tmp_path, "model.knowledge.enabled=false"))
    assert obj["model"].model.knowledge is None
    assert not any("knowledge" in k for k in obj["model"].state_dict())
