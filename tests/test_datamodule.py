"""ImageTextDataModule: batches, captions per split, skipped-sample accounting, streaming shard splitting."""

import base64
import io

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from t2i.callbacks.data_report import DataReport
from t2i.data.datamodule import ImageTextDataModule
from t2i.data.formats import open_source
from t2i.data.shards import convert
from t2i.data.skips import DataError
from t2i.data.tokenizer import TextTokenizer
from t2i.data.transforms import ImageTransform, from_raw, to_pil, to_tensor

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tok_path(tmp_path):
    path = tmp_path / "tok.json"
    TextTokenizer.train(["红色 方块", "绿色 方块", "蓝色 方块", "red square", "第一 第二"], vocab_size=100).save(path)
    return path


def write_tsv(path, n, bad_rows=()):
    lines = []
    for i in range(n):
        lines.append(f"{i}\t红色 方块 {i}\t{base64.b64encode(png(COLOURS[i % 6])).decode()}")
    for text in bad_rows:
        lines.append(text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_transform_resize_crop_range():
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    x = ImageTransform(32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(32, 32)) and torch.allclose(x[1], -torch.ones(32, 32))
    u = ImageTransform(32, raw=True)(img)
    assert u.shape == (32, 32, 3) and u.dtype == torch.uint8 and u[0, 0].tolist() == [255, 0, 0]
    assert torch.equal(from_raw(u[None])[0], x)
    assert to_pil(to_tensor(img)).getpixel((0, 0)) == (255, 0, 0)


def test_batches_from_easynlp_tsv(tmp_path, tok_path):
    tsv = write_tsv(tmp_path / "train.tsv", 10)
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), val=str(tsv), tokenizer=str(tok_path),
                             image_size=16, text_len=6, batch_size=4, num_workers=0)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["text"].shape == (4, 6) and batch["text"].dtype == torch.long
    assert "skipped" not in batch and len(batch["caption"]) == 4
    assert dm.tokenizer.decode(batch["text"][0]).startswith("红色方块")
    assert len(dm.datasets["train"]) == 10 and len(dm.datasets["val"]) == 10


def test_train_one_caption_eval_every_caption(tmp_path, tok_path):
    """MUGE: several text rows per image id -> training sees each image once, evaluation every pair."""
    root = tmp_path / "muge"
    root.mkdir()
    (root / "T2I_train.text.tsv").write_text("a\t红色\na\t红色 方块\nb\t绿色\n", encoding="utf-8")
    imgs = "".join(f"{k}\t{base64.b64encode(png(c)).decode()}\n" for k, c in [("a", COLOURS[0]), ("b", COLOURS[1])])
    (root / "T2I_train.img.tsv").write_text(imgs)
    spec = {"root": str(root), "split": "train"}
    dm = ImageTextDataModule(source="muge", train=spec, val=spec, tokenizer=str(tok_path), image_size=8,
                             text_len=4, batch_size=8, num_workers=0)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert sorted(train["key"]) == ["a", "b"]
    assert sorted(zip(val["key"], val["caption"])) == [("a", "红色"), ("a", "红色 方块"), ("b", "绿色")]


def test_val_fraction_carves_disjoint_split(tmp_path, tok_path):
    tsv = write_tsv(tmp_path / "train.tsv", 20)
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), tokenizer=str(tok_path), image_size=8,
                             val_fraction=0.25, num_workers=0)
    dm.setup("fit")
    train_keys = {r.key for r in dm.datasets["train"].records}
    val_keys = {r.key for r in dm.datasets["val"].records}
    assert len(val_keys) == 5 and len(train_keys) == 15 and not train_keys & val_keys


def test_missing_split_and_bad_index_are_clear(tmp_path, tok_path):
    with pytest.raises(DataError, match=r"data.train=.*nope.tsv"):
        ImageTextDataModule(source="easynlp_tsv", train=str(tmp_path / "nope.tsv"),
                            tokenizer=str(tok_path)).setup("fit")
    tsv = write_tsv(tmp_path / "t.tsv", 4, bad_rows=["only-one-column", "x\t\tAAAA"])
    with pytest.raises(DataError, match=r"2 of 6 samples were bad.*worst file: .*t.tsv"):
        ImageTextDataModule(source="easynlp_tsv", train=str(tsv), tokenizer=str(tok_path)).setup("fit")
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(write_tsv(tmp_path / "ok.tsv", 4)),
                             tokenizer=str(tok_path), num_workers=0)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and not dm.has_split("val")
    with pytest.raises(DataError, match="data.test is not set"):
        dm.test_dataloader()


class Mean(pl.LightningModule):
    """Minimal real module: learns the mean image colour."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def step(self, batch):
        if "image" not in batch:
            return None
        return ((batch["image"].mean((2, 3)) - self.w) ** 2).mean()

    def training_step(self, batch, i):
        return self.step(batch)

    def validation_step(self, batch, i):
        self.log("val/loss", self.step(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, tmp_path, epochs=1):
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[DataReport()], default_root_dir=tmp_path, num_sanity_val_steps=0,
                         enable_model_summary=False)
    trainer.fit(Mean(), datamodule=dm)
    return trainer


def corrupt_tsv(tmp_path, n_good, n_truncated):
    """Rows that index fine but fail to decode (truncated PNG): found by the loader workers."""
    path = write_tsv(tmp_path / "train.tsv", n_good)
    with open(path, "a", encoding="utf-8") as f:
        for i in range(n_truncated):
            f.write(f"bad{i}\tcap\t{base64.b64encode(png(COLOURS[0])[:50]).decode()}\n")
    return path


def test_decode_failures_are_counted_across_workers(tmp_path, tok_path, caplog):
    tsv = corrupt_tsv(tmp_path, 99, 1)
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), val=str(tsv), tokenizer=str(tok_path),
                             image_size=8, batch_size=16, num_workers=2, max_bad_fraction=0.05)
    logs = {}
    orig = dm.logs["train"].reset
    dm.logs["train"].reset = lambda: (logs.update(dm.logs["train"].to_dict()), orig())
    with caplog.at_level("WARNING"):
        trainer = fit(dm, tmp_path)
    assert logs["n_ok"] == 99 and logs["by_reason"] == {"bad_image": 1}
    assert logs["examples"]["bad_image"] == [f"{tsv}:100"]
    assert "train data: 99 ok, 1 skipped (1.00%)" in caplog.text
    assert trainer.callback_metrics["train/skipped"] == 1


def test_too_many_decode_failures_stop_the_run(tmp_path, tok_path):
    tsv = corrupt_tsv(tmp_path, 20, 5)
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), tokenizer=str(tok_path), image_size=8,
                             batch_size=8, num_workers=0, max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"train data: 5 of 25 samples were bad .*worst file: .*train.tsv"):
        fit(dm, tmp_path)


def test_checkpoint_carries_tokenizer(tmp_path, tok_path):
    tsv = write_tsv(tmp_path / "train.tsv", 4)
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), tokenizer=str(tok_path))
    state = dm.state_dict()
    assert TextTokenizer.from_str(state["tokenizer"]).fingerprint == dm.tokenizer.fingerprint
    dm.load_state_dict(state)  # same tokenizer: fine
    other = TextTokenizer.train(["完全 不同"], vocab_size=30)
    with pytest.raises(DataError, match="different text tokenizer"):
        dm.load_state_dict({"tokenizer": other.to_str()})


@pytest.fixture
def shards(tmp_path):
    tsv = write_tsv(tmp_path / "src.tsv", 24)
    summary = convert(open_source("easynlp_tsv", str(tsv)), tmp_path / "shards", shard_size=6, progress=False)
    assert len(summary["shards"]) == 4
    return str(tmp_path / "shards" / "*.tar")


def stream_keys(shards, tok_path, workers, **kwargs):
    dm = ImageTextDataModule(source="wds", streaming=True, train=shards, val=shards, tokenizer=str(tok_path),
                             image_size=8, batch_size=5, num_workers=workers, shuffle_buffer=0, **kwargs)
    dm.setup("fit")
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    return keys


def test_streaming_splits_shards_by_worker_and_rank(shards, tok_path, monkeypatch):
    everything = stream_keys(shards, tok_path, 0)
    assert len(everything) == 24 and len(set(everything)) == 24
    assert sorted(stream_keys(shards, tok_path, 2)) == sorted(everything)  # workers: disjoint, complete
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append(stream_keys(shards, tok_path, 2))
    assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert not set(per_rank[0]) & set(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == set(everything)


def test_streaming_corrupt_shard_names_it(shards, tok_path, tmp_path):
    import glob

    from t2i.cli.common import one_line

    last = sorted(glob.glob(shards))[-1]
    data = open(last, "rb").read()
    open(last, "wb").write(data[: len(data) // 2 + 100])  # not whole blocks: caught before streaming
    with pytest.raises(DataError, match=f"data.train: shard {last} is truncated"):
        stream_keys(shards, tok_path, 0)
    cut = len(data) // 2 // 512 * 512
    open(last, "wb").write(data[:cut])  # whole blocks: tarfile alone would just stop early
    with pytest.raises(DataError, match=f"shard {last} is cut off after byte {cut}"):
        stream_keys(shards, tok_path, 0)
    # without the check, a shard that fails while streaming is still one clear error naming it
    bad = bytearray(data)
    bad[: 512] = b"\x07" * 512  # the first header: webdataset raises at once
    open(last, "wb").write(bytes(bad))
    for workers in (0, 1):
        with pytest.raises(DataError) as info:
            stream_keys(shards, tok_path, workers, verify_shards=False)
        msg = one_line(info.value)
        assert msg.startswith(f"{last} cannot be read") and "t2i-data convert" in msg


def test_all_bad_batch_keeps_every_key(tmp_path, tok_path):
    tsv = corrupt_tsv(tmp_path, 0, 3)
    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), tokenizer=str(tok_path), image_size=8,
                             text_len=5, batch_size=3, num_workers=0, max_bad_fraction=1.0)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape == (0, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (0, 5) and batch["key"] == [] and batch["caption"] == []


def epoch_keys(ds, epochs=1):
    return [[x["key"] for x in ds] for _ in range(epochs)]


def test_streaming_epoch_length_is_exact_per_rank(shards, tok_path):
    from torch.utils.data import DataLoader

    from t2i.data.streaming import StreamingPairs, worker_share
    from t2i.data.wds import expand_urls

    assert [worker_share(10, w, 3) for w in range(3)] == [4, 3, 3]
    urls = [str(u) for u in expand_urls(shards)]
    tf = ImageTransform(8, raw=True)
    for workers in (0, 2, 3):
        for rank in (0, 1):
            ds = StreamingPairs(urls, tf, False, shuffle=4, epoch_length=17, seed=1, rank=rank, world_size=2)
            loader = DataLoader(ds, batch_size=None, num_workers=workers)
            keys = [x["key"] for x in loader]
            # exactly 17 per rank whatever the worker count (3 workers, 2 shards: one idles), cycling
            # over the data as often as needed (12 samples per rank per pass)
            assert len(keys) == 17, (workers, rank)
            assert len(set(keys)) >= 12


def test_streaming_shuffle_is_seeded(shards):
    from t2i.data.streaming import StreamingPairs
    from t2i.data.wds import expand_urls

    urls = [str(u) for u in expand_urls(shards)]
    tf = ImageTransform(8, raw=True)
    a = epoch_keys(StreamingPairs(urls, tf, False, shuffle=8, seed=3), epochs=2)
    b = epoch_keys(StreamingPairs(urls, tf, False, shuffle=8, seed=3), epochs=2)
    c = epoch_keys(StreamingPairs(urls, tf, False, shuffle=8, seed=4), epochs=1)
    assert a == b  # same seed: same order, epoch after epoch
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])  # a new order each epoch, same samples
    assert c[0] != a[0]
    # ranks partition the shards even when shuffled: the shard order is shared
    r0 = epoch_keys(StreamingPairs(urls, tf, False, shuffle=8, seed=3, rank=0, world_size=2))[0]
    r1 = epoch_keys(StreamingPairs(urls, tf, False, shuffle=8, seed=3, rank=1, world_size=2))[0]
    assert not set(r0) & set(r1) and len(r0) + len(r1) == 24


def test_streaming_config_errors(shards, tok_path):
    with pytest.raises(DataError, match="val_fraction needs an indexed source"):
        ImageTextDataModule(source="wds", streaming=True, train=shards, val_fraction=0.1,
                            tokenizer=str(tok_path)).setup("fit")


def _gather_worker(rank, path):
    import json

    import torch.distributed as dist

    from t2i.callbacks.data_report import gather
    from t2i.data.skips import SkipLog

    dist.init_process_group("gloo", init_method=f"file://{path}/rdzv", rank=rank, world_size=2)
    log = SkipLog(0.01, name="train data")
    log.ok(10 + rank)
    log.skip("bad_image", f"shard{rank}.tar:k{rank}")
    merged = gather(log)
    (path / f"out{rank}.json").write_text(json.dumps(merged.to_dict()))
    dist.destroy_process_group()


def test_skip_counts_are_merged_over_ranks(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(tmp_path,), nprocs=2)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    assert outs[0] == outs[1]
    assert outs[0]["n_ok"] == 21 and outs[0]["by_reason"] == {"bad_image": 2}
    assert sorted(outs[0]["examples"]["bad_image"]) == ["shard0.tar:k0", "shard1.tar:k1"]


def test_shapes_built_on_first_use_and_rebuilt_when_config_changes(tmp_path):
    out, tok = tmp_path / "shapes", tmp_path / "shapes" / "tokenizer.json"

    def dm(n_train):
        shapes = {"output": str(out), "n_train": n_train, "n_val": 4, "n_test": 4, "n_compositional": 4,
                  "image_size": 16, "lang": "en", "seed": 0, "vocab_size": 100}
        m = ImageTextDataModule(source="easynlp_tsv", train=str(out / "shapes_train.tsv"), tokenizer=str(tok),
                                image_size=16, text_len=12, num_workers=0, shapes=shapes)
        m.prepare_data()
        m.setup("fit")
        return m

    first = dm(10)
    assert len(first.datasets["train"]) == 10 and first.tokenizer.decode(first.tokenizer.encode("a red circle", 12)[0])
    stamp = (out / "meta.json").stat().st_mtime_ns
    dm(10)
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # same config: reused
    assert len(dm(12).datasets["train"]) == 12  # different config: rebuilt, not silently reused
