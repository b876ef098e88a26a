"""The order in which images are shown, and which rows of a micro-batch each process trains on."""

from __future__ import annotations

import functools
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

CLASS_STREAM_SEED_OFFSET = 7919  # the class images' stream is independent of the instance images'


def stream_indices(seed: int, n: int, start: int, count: int) -> list[tuple[int, bool]]:
    """Positions start..start+count of an endless stream of shuffled epochs: (index, flip) pairs.

    A pure function of its arguments, so a resumed run and every rank of a distributed run agree.
    """
    out = []
    for pos in range(start, start + count):
        epoch, within = divmod(pos, n)
        rng = random.Random(f"{seed}:{epoch}")
        order = list(range(n))
        rng.shuffle(order)
        flips = [rng.random() < 0.5 for _ in range(n)]
        out.append((order[within], flips[within]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_batches(seed: int, entries: tuple, bucket_of: tuple, size: int, epoch: int) -> tuple:
    """One epoch of batches: (bucket, ((index, flip), ...)) each, `size` picks of one bucket."""
    rng = random.Random(f"{seed}:{epoch}")
    groups: dict = {}
    for entry in entries:
        groups.setdefault(bucket_of[entry], []).append(entry)
    batches = []
    for bucket in sorted(groups, key=_bucket_order):
        order = list(groups[bucket])
        rng.shuffle(order)
        picks = list(zip(order, [rng.random() < 0.5 for _ in order]))
        for start in range(0, len(picks), size):
            batch = picks[start : start + size]
            while len(batch) < size:  # the bucket's last short batch wraps round its own shuffled entries
                batch += picks[: size - len(batch)]
            batches.append((bucket, tuple(batch)))
    if len(groups) > 1:  # one bucket: its shuffle is the order already (and equals stream_indices at size 1)
        rng.shuffle(batches)
    return tuple(batches)


def _bucket_order(bucket) -> tuple:
    return (bucket[0] / bucket[1], bucket) if isinstance(bucket, tuple) and len(bucket) == 2 else (0.0, bucket)


def stream_batch(
    seed: int, entries: Sequence[int], bucket_of: Sequence[Hashable], size: int, k: int
) -> tuple[Hashable, list[tuple[int, bool]]]:
    """Batch k of an endless stream of shuffled epochs over `entries` (image indices; one may appear several
    times), every batch `size` (index, flip) picks of one bucket (`bucket_of[index]`).

    Each epoch (seeded by seed and epoch) shuffles each bucket's entries and draws a flip per entry, cuts each
    bucket into batches of `size` (a last short batch wraps round that bucket's own entries, so every batch is
    full and of one bucket), then shuffles the order of the batches. A pure function of its arguments, so a
    resumed run and every rank of a distributed run agree. With one bucket and `entries` = range(n), batch k at
    size 1 is stream_indices' position k, and at a size that divides n its positions k*size to (k+1)*size - 1.
    """
    per_epoch = _epoch_batches(seed, tuple(entries), tuple(bucket_of), size, 0)
    epoch, within = divmod(k, len(per_epoch))
    bucket, picks = _epoch_batches(seed, tuple(entries), tuple(bucket_of), size, epoch)[within]
    return bucket, list(picks)


@dataclass(frozen=True)
class BatchLayout:
    """The rows of one global micro-batch and this process's share of them.

    With B = per-process batch size and W processes, the global micro-batch has G = B * W instance rows,
    rows [0, G), and, with prior preservation, G class rows, rows [G, 2G). Micro-batch k shows the stream
    positions [k*G, (k+1)*G) of each image stream. Every process draws the randomness (noise, timesteps,
    latent samples) of all rows in this order and keeps only its own rows: instance rows [r*B, (r+1)*B)
    and the class rows at the same offsets plus G. So a W-process run trains on exactly the rows a
    1-process run with batch G would, and the stream never depends on W.

    The instance rows of micro-batch k are batch k of `stream_batch` (all G of one aspect-ratio bucket, so one
    latent shape); the class rows are positions [k*G, (k+1)*G) of the class stream, fitted to that bucket.
    """

    per_process: int  # B
    processes: int = 1  # W
    rank: int = 0  # r
    with_prior: bool = False

    @property
    def global_instances(self) -> int:  # G
        return self.per_process * self.processes

    @property
    def rows(self) -> int:
        """Rows of the global micro-batch: G, or 2G with class rows."""
        return 2 * self.global_instances if self.with_prior else self.global_instances

    @property
    def own(self) -> slice:
        """This process's slice of the G instance positions (and of the class positions)."""
        return slice(self.rank * self.per_process, (self.rank + 1) * self.per_process)

    def own_instance_rows(self) -> list[int]:
        return list(range(self.global_instances))[self.own]

    def own_class_rows(self) -> list[int]:
        return [self.global_instances + r for r in self.own_instance_rows()] if self.with_prior else []

    def own_rows(self) -> list[int]:
        """This process's rows of the global micro-batch: its instance rows, then its class rows."""
        return self.own_instance_rows() + self.own_class_rows()

    def positions(self, micro_batch: int) -> list[int]:
        """The stream positions of this process's instance (and class) rows in micro-batch `micro_batch`."""
        first = micro_batch * self.global_instances
        return list(range(first, first + self.global_instances))[self.own]

    def instance_batch(
        self, seed: int, entries: Sequence[int], bucket_of: Sequence[Hashable], micro_batch: int
    ) -> tuple[Hashable, list[tuple[int, bool]]]:
        """(the bucket, (image index, flip) for this process's instance rows) of micro-batch `micro_batch`."""
        bucket, picks = stream_batch(seed, entries, bucket_of, self.global_instances, micro_batch)
        return bucket, picks[self.own]

    def picks(self, seed: int, n_images: int, micro_batch: int) -> list[tuple[int, bool]]:
        """(image index, flip) for this process's rows of a plain stream of `n_images` images (the class images)."""
        first = micro_batch * self.global_instances
        return stream_indices(seed, n_images, first, self.global_instances)[self.own]
