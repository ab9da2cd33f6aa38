"""Preference-pair loading (Pick-a-Pic v2 schema) from small parquet files built here: no hub, no network."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bench.errors import DataError
from bench.pairs import PairStats, PairStream, iter_pairs, open_rows, preprocess

LABELS = [1, 0, 0.5, 1, 0.5, 0, 1, 1, 0, 1]
WIN, LOSE = (250, 0, 0), (0, 0, 250)  # red is always the preferred image, blue the dispreferred one


def jpeg(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def pick_rows(labels, start=0):
    """Rows whose stored order puts the red (preferred) image where label_0 says it is."""
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for n, label in enumerate(labels, start):
        first, second = (WIN, LOSE) if label != 0 else (LOSE, WIN)
        rows["caption"].append(f"prompt {n}")
        rows["jpg_0"].append(jpeg(first, (40, 30)))
        rows["jpg_1"].append(jpeg(second, (30, 50)))
        rows["label_0"].append(float(label))
    return rows


def write(path, rows, **extra):
    table = pa.table({**rows, **extra})
    pq.write_table(table, path)
    return str(path)


def near(image, color, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(image.getpixel((5, 5)), color))


@pytest.fixture
def ten(tmp_path):
    return write(tmp_path / "ten.parquet", pick_rows(LABELS))


def test_iter_pairs_swaps_drops_ties_and_counts(ten):
    stats = PairStats(source=ten, split="train")
    pairs = list(iter_pairs({"source": ten}, stats))
    assert [c for c, _, _ in pairs] == [f"prompt {n}" for n, lab in enumerate(LABELS) if lab != 0.5]
    for _, win, lose in pairs:
        assert win.mode == lose.mode == "RGB"
        assert near(win, WIN) and near(lose, LOSE)
    # row 1 has label 0: the preferred image was stored in jpg_1 (30x50) and comes first
    assert pairs[1][1].size == (30, 50) and pairs[0][1].size == (40, 30)
    assert stats.as_dict() == {"source": ten, "split": "train", "rows_read": 10, "ties_dropped": 2, "pairs": 8}

    stats = PairStats(source=ten, split="train")
    kept = list(iter_pairs({"source": ten, "drop_ties": False}, stats))
    assert len(kept) == 10 and stats.ties_dropped == 0 and stats.pairs == 10
    assert kept[2][1].size == (40, 30)  # a tie keeps the stored order

    stats = PairStats(source=ten, split="train")
    assert [c for c, _, _ in iter_pairs({"source": ten, "limit": 3}, stats)] == ["prompt 0", "prompt 1", "prompt 3"]
    assert stats.pairs == 3 and stats.rows_read == 4 and stats.ties_dropped == 1


def test_extra_columns_ignored_and_schema_errors(tmp_path):
    rows = pick_rows([1, 0])
    path = write(tmp_path / "extra.parquet", rows, jpg_extra=[b"not an image"] * 2, score=[1, 2])
    ds = open_rows({"source": path})
    assert sorted(next(iter(ds))) == ["caption", "jpg_0", "jpg_1", "label_0"]
    assert len(list(iter_pairs({"source": path}, PairStats(path, "train")))) == 2

    no_label = write(tmp_path / "nolabel.parquet", {k: v for k, v in rows.items() if k != "label_0"})
    with pytest.raises(DataError, match="label_0") as err:
        open_rows({"source": no_label})
    assert "Pick-a-Pic" in str(err.value) and "\n" not in str(err.value)

    with pytest.raises(DataError, match="not found"):
        open_rows({"source": str(tmp_path / "missing.parquet")})
    with pytest.raises(DataError, match="no files match"):
        open_rows({"source": str(tmp_path / "nothing-*.parquet")})


def test_garbage_image_names_row_and_column(tmp_path):
    rows = pick_rows([1, 1, 0, 1])
    rows["jpg_1"][2] = b"\xff\xd8garbage"
    path = write(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"row 2 .*column jpg_1"):
        list(iter_pairs({"source": path}, PairStats(path, "train")))


def test_folder_of_parquet_files_is_one_dataset(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write(folder / "part-0.parquet", pick_rows([1, 0, 1]))
    write(folder / "part-1.parquet", pick_rows([0, 0.5, 1], start=3))
    stats = PairStats(str(folder), "train")
    captions = [c for c, _, _ in iter_pairs({"source": str(folder)}, stats)]
    assert captions == ["prompt 0", "prompt 1", "prompt 2", "prompt 3", "prompt 5"]
    assert stats.rows_read == 6 and stats.ties_dropped == 1
    glob_captions = [c for c, _, _ in iter_pairs({"source": str(folder / "*.parquet")}, PairStats("g", "train"))]
    assert glob_captions == captions


def test_preprocess_matches_dpo_transform():
    red = preprocess(Image.new("RGB", (40, 30), (255, 0, 0)), 16, flip=False)
    assert red.shape == (3, 16, 16) and red.dtype == torch.float32
    assert red.min() >= -1 and red.max() <= 1
    assert torch.allclose(red.mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.02)

    ramp = Image.new("RGB", (30, 50))
    ramp.putdata([(x * 8, 255 - x * 8, 128) for _ in range(50) for x in range(30)])
    plain = preprocess(ramp, 16, flip=False)
    flipped = preprocess(ramp, 16, flip=True)
    assert plain.shape == (3, 16, 16) and plain.min() >= -1 and plain.max() <= 1
    assert plain[0, 0, 0] < plain[0, 0, -1]  # red grows left to right
    assert torch.equal(flipped, plain.flip(-1))


def captions(batch):
    return [c for c, _, _ in batch]


def test_pair_stream_resumes_and_wraps_epochs(ten):
    cfg = {"source": ten}
    stream = PairStream(cfg)
    first = captions(stream.take(0, 3)) + captions(stream.take(3, 3)) + captions(stream.take(6, 3))
    epoch0 = [f"prompt {n}" for n, lab in enumerate(LABELS) if lab != 0.5]
    assert first == epoch0 + epoch0[:1]  # position 8 wraps to the first pair of epoch 1
    assert stream.stats.pairs == 9 and stream.stats.rows_read == 11 and stream.stats.ties_dropped == 2

    resumed = PairStream(cfg)
    assert captions(resumed.take(3, 3)) + captions(resumed.take(6, 3)) == first[3:]
    # a position behind the live iterator reopens the stream; stats describe the position, not the history
    batch = resumed.take(1, 2)
    assert captions(batch) == first[1:3]
    assert near(batch[0][1], WIN) and near(batch[0][2], LOSE)
    assert resumed.stats.pairs == 3 and resumed.stats.rows_read == 4


def test_pair_stream_shuffle_is_a_function_of_seed_and_epoch(tmp_path):
    path = write(tmp_path / "twenty.parquet", pick_rows([1] * 20))
    cfg = {"source": path, "shuffle_buffer": 8, "seed": 3}
    a, b = PairStream(cfg), PairStream(cfg)
    first = captions(a.take(0, 40))
    assert first == captions(b.take(0, 40))
    epoch0, epoch1 = first[:20], first[20:]
    assert epoch0 != [f"prompt {n}" for n in range(20)]  # actually shuffled
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    assert captions(PairStream(cfg).take(25, 5)) == first[25:30]
    assert captions(PairStream({**cfg, "seed": 4}).take(0, 20)) != epoch0


def test_empty_or_all_ties_epoch_is_an_error(tmp_path):
    path = write(tmp_path / "ties.parquet", pick_rows([0.5, 0.5]))
    with pytest.raises(DataError, match="every row is a tie or the dataset is empty"):
        PairStream({"source": path}).take(0, 1)


def test_hub_id_offline_names_the_dataset_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        open_rows({"source": "no-such-owner/pickapic_v2_offline_test", "split": "train"})
    message = str(err.value)
    assert "no-such-owner/pickapic_v2_offline_test" in message and "data.source" in message and "offline" in message
