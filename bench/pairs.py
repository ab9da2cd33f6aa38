"""Preference pairs in the Pick-a-Pic v2 schema, streamed so a large dataset never has to fit on disk.

Rows hold ``caption``, ``jpg_0``, ``jpg_1`` (JPEG bytes) and ``label_0`` (1.0: jpg_0
preferred, 0.0: jpg_1 preferred, 0.5: a tie). The source is a hub dataset id
(``yuvalkirstain/pickapic_v2``) or local parquet: a file, a folder of files or a
glob. The order of pairs is a pure function of (source, seed, epoch), so a
resumed run sees exactly the pairs the interrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import glob
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.errors import DataError
from bench.io import hub_offline

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
SCHEMA = "Pick-a-Pic v2 (caption, jpg_0, jpg_1, label_0)"
_GLOB_CHARS = "*?["


@dataclass
class PairStats:
    """What the manifest records about the data a run consumed."""

    source: str
    split: str
    rows_read: int = 0  # rows consumed from the stream so far
    ties_dropped: int = 0
    pairs: int = 0  # pairs yielded

    def as_dict(self) -> dict:
        return asdict(self)


def is_local_source(source: str) -> bool:
    """A path-like source is read from disk; anything else is a hub dataset id ("owner/name")."""
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", ".", "~"))
        or source.endswith(".parquet")
        or any(c in source for c in _GLOB_CHARS)
    )


def _local_files(source: str) -> list[str]:
    """Expand a file, folder or glob to a sorted list of parquet files (sorted: the order must not depend on the OS)."""
    path = Path(source).expanduser()
    if any(c in source for c in _GLOB_CHARS):
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise DataError(f"no files match data.source={source} (set data.source=PATH to a .parquet file, a folder of them or a glob)")
        return files
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DataError(f"no .parquet files in folder {path} (set data.source=PATH to a .parquet file, a folder of them or a glob)")
        return files
    if path.is_file():
        return [str(path)]
    raise DataError(f"preference data not found: {path} (set data.source=PATH to a .parquet file, a folder of them or a glob)")


@contextlib.contextmanager
def _offline_as_env():
    """`datasets` reads HF_HUB_OFFLINE once at import; honour the variable as it is now, so an offline run never waits on the network."""
    import datasets.config

    if not hub_offline():
        yield
        return
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _first_line(err: Exception) -> str:
    """Library messages can span lines; a DataError is one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def open_rows(data_cfg: dict, epoch: int = 0):
    """A streamed ``datasets.IterableDataset`` of the four Pick-a-Pic columns, shuffled by (seed, epoch) when asked.

    Streaming keeps memory and disk flat on the 1M-row hub dataset; keeping only the
    four columns means image bytes of other columns are never read into rows.
    """
    import datasets

    source = str(data_cfg["source"])
    split = data_cfg.get("split") or "train"
    if is_local_source(source):
        files = _local_files(source)
        try:
            ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        except Exception as err:  # a corrupt or non-parquet file
            raise DataError(f"cannot read parquet data.source={source}: {_first_line(err)} (is every file valid parquet?)") from None
    else:
        try:
            with _offline_as_env():
                ds = datasets.load_dataset(source, split=split, revision=data_cfg.get("revision"), streaming=True)
        except ConnectionError:
            raise DataError(
                f"dataset {source} is not in the local cache and the hub is offline: "
                f"set data.source=/path/to/parquet (a file, folder or glob), or download {source} where there is network"
            ) from None
        except FileNotFoundError as err:  # DatasetNotFoundError, or a split/revision that does not exist
            raise DataError(
                f"dataset {source} (split {split}) not found: {_first_line(err)} (check data.source, data.split, data.revision)"
            ) from None
        except ValueError as err:  # e.g. an unknown split
            raise DataError(f"cannot open dataset {source} split {split}: {_first_line(err)} (check data.split)") from None
    names = ds.column_names
    if names is not None:
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(
                f"{source} lacks column(s) {', '.join(missing)}: expected the {SCHEMA} schema, "
                f"found columns {', '.join(names)} (point data.source at Pick-a-Pic-style parquet)"
            )
    ds = ds.select_columns(list(COLUMNS))
    buffer = int(data_cfg.get("shuffle_buffer") or 0)
    if buffer > 0:
        # Interleaving shards runs reader threads that `datasets` ends with a 5 s sleep (an arrow
        # workaround); with one shard there is nothing to interleave, so skip it.
        shards = max(1, min(10, ds.num_shards))
        ds = ds.shuffle(seed=int(data_cfg.get("seed") or 0), buffer_size=buffer, max_buffer_input_shards=shards)
        ds.set_epoch(epoch)
    return ds


def _decode(data, row: int, column: str, source: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as err:
        raise DataError(
            f"cannot decode image in {source}: row {row} (0-based, stream order) column {column}: "
            f"{type(err).__name__} (remove or fix that row)"
        ) from None


def _pair_rows(data_cfg: dict, stats: PairStats, epoch: int):
    """Yield (row index, caption, preferred bytes, dispreferred bytes, preferred column, dispreferred column), undecoded.

    Kept apart from decoding so a resumed stream can skip pairs without paying for JPEG decodes.
    """
    drop_ties = data_cfg.get("drop_ties", True)
    limit = data_cfg.get("limit")
    yielded = 0
    if limit is not None and int(limit) <= 0:
        return
    for i, row in enumerate(open_rows(data_cfg, epoch)):
        stats.rows_read += 1
        label = row["label_0"]
        if label == 1:
            first, second = "jpg_0", "jpg_1"
        elif label == 0:
            first, second = "jpg_1", "jpg_0"
        elif drop_ties:
            stats.ties_dropped += 1
            continue
        else:
            first, second = "jpg_0", "jpg_1"
        stats.pairs += 1
        yielded += 1
        yield i, str(row["caption"] or ""), row[first], row[second], first, second
        if limit is not None and yielded >= int(limit):
            return


def iter_pairs(data_cfg: dict, stats: PairStats, epoch: int = 0):
    """Yield (caption, preferred RGB image, dispreferred RGB image) in stream order, ties dropped unless drop_ties is false.

    Ties carry no preference signal, so Diffusion-DPO drops them by default.
    """
    source = str(data_cfg["source"])
    for i, caption, win, lose, win_col, lose_col in _pair_rows(data_cfg, stats, epoch):
        yield caption, _decode(win, i, win_col, source), _decode(lose, i, lose_col, source)


def preprocess(image, resolution: int, flip: bool) -> torch.Tensor:
    """The Diffusion-DPO (Salesforce/diffusers) transform: shorter side to `resolution`, centre crop, optional mirror, [-1, 1].

    Matching it keeps results comparable with the published training recipe.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = TF.resize(image.convert("RGB"), resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    image = TF.center_crop(image, resolution)
    tensor = TF.to_tensor(image)
    if flip:
        tensor = tensor.flip(-1)
    return tensor * 2.0 - 1.0


class PairStream:
    """Pairs by absolute position: batch k of size B is pairs [k*B, (k+1)*B) of epoch0, epoch1, ... concatenated.

    Positions, not iterator state, define a batch, so a resumed run only needs the step
    number. One live iterator serves forward reads; a position behind it (a resume)
    reopens the stream and skips forward without decoding. ``stats`` counts what the
    live iterator consumed from position 0, so it is the same however that position was reached.
    """

    def __init__(self, data_cfg: dict):
        self.data_cfg = dict(data_cfg)
        self._reopen()

    def _reopen(self) -> None:
        self.stats = PairStats(source=str(self.data_cfg["source"]), split=self.data_cfg.get("split") or "train")
        self._epoch = 0
        self._pos = 0  # absolute position of the next pair the live iterator gives
        self._it = _pair_rows(self.data_cfg, self.stats, 0)
        self._epoch_pairs = 0

    def _next(self):
        while True:
            item = next(self._it, None)
            if item is not None:
                self._pos += 1
                self._epoch_pairs += 1
                return item
            if self._epoch_pairs == 0:
                raise DataError(
                    f"no preference pairs in {self.stats.source} (split {self.stats.split}): every row is a tie or the dataset is empty "
                    f"(set data.drop_ties=false to keep ties, or point data.source at other data)"
                )
            self._epoch += 1
            self._epoch_pairs = 0
            self._it = _pair_rows(self.data_cfg, self.stats, self._epoch)

    def take(self, start: int, count: int) -> list:
        """Pairs [start, start + count) as (caption, preferred image, dispreferred image)."""
        if start < self._pos:
            self._reopen()
        while self._pos < start:
            self._next()
        source = self.stats.source
        out = []
        for _ in range(count):
            i, caption, win, lose, win_col, lose_col = self._next()
            out.append((caption, _decode(win, i, win_col, source), _decode(lose, i, lose_col, source)))
        return out
