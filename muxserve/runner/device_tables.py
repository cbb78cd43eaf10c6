"""Block tables kept on the device, per request, so a step sends only the rows they gained.

Every job of a runner reads its sequences' block tables padded into one (B, width, layers,
kv_heads) int64 tensor (the kernels, the padded path, a decode graph's static input). Built on
the host from each sequence's whole table (`pad_tables`), that tensor is copied to the device
whole every step: for Llama-7B's layout (32 layers x 32 KV heads) 8 KiB per logical block per
sequence. Here each request owns a slot of one device tensor, a table grows there by the rows it
gained since its last job, and the batch's padded table is a gather of its slots on the device.

A step's host-to-device traffic is one copy of one packed int64 array: the batch's slot ids,
then the (slot, row) index and contents of each appended row. Rows past a table's end read 0,
exactly as `pad_tables` pads: a slot is zero past its table except where an earlier table of
the slot (a released request, or this one before its re-admission) reached, and those rows are
sent as zeros with the next table written there, so no device work happens on release.

Slot 0 stays all zeros: the rows of a decode graph's padding read it. The store grows, slots
and rows by doubling (rows start at the runner's longest context, or INITIAL_ROWS if less), by
copying on the device after a device-wide sync, since a job of the other phase may be reading
or writing it on another stream; growth is rare.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from muxserve.scheduler.job import SeqWork

INITIAL_SLOTS = 16  # requests before the first growth (slot 0 is the padding's)
# rows to start with at most: 4k tokens of 32-token blocks. A 128k-context model would otherwise
# hold 8 MiB per slot from the start (Llama-3-8B's 4,096 rows x 32 layers x 8 heads x 8 bytes)
INITIAL_ROWS = 128


class DeviceTables:
    """One runner's block tables on its device: a slot per request, grown by appended rows."""

    def __init__(
        self,
        device: torch.device,
        num_layers: int,
        num_kv_heads: int,
        max_rows: int,  # logical blocks of the longest context: the runner's max / per block
        slots: int = INITIAL_SLOTS,
    ) -> None:
        """Room for `slots` requests (doubled when full) of `max_rows` logical blocks, or of
        INITIAL_ROWS where that is less (doubled when a longer table comes)."""
        if max_rows < 1 or slots < 2:
            raise ValueError(
                f"device tables need max_rows >= 1 and slots >= 2; got {max_rows}, {slots}"
            )
        self.device = device
        self.row_shape = (num_layers, num_kv_heads)
        # (slots, rows, layers, kv_heads) int64, as the kernels read block tables
        self.tables = torch.zeros(
            (slots, min(max_rows, INITIAL_ROWS), *self.row_shape),
            dtype=torch.int64,
            device=device,
        )
        self._slot: dict[str, int] = {}  # request -> its slot
        self._sent: dict[str, int] = {}  # request -> rows of its current table on the device
        self._dirty = [0] * slots  # per slot: rows at and past this are zero
        self._free = list(range(slots - 1, 0, -1))  # free slots, lowest last (popped first)

    def __len__(self) -> int:
        """Requests holding a slot."""
        return len(self._slot)

    def release(self, request_ids: Iterable[str]) -> None:
        """These requests finished: free their slots. Unknown ids (or a second release) do
        nothing; the rows stay on the device until the slot's next table overwrites them."""
        for rid in request_ids:
            slot = self._slot.pop(rid, None)
            self._sent.pop(rid, None)
            if slot is not None:
                self._free.append(slot)

    def update(
        self, seqs: Sequence[SeqWork], fresh: Iterable[str] = (), pad_to: int | None = None
    ) -> torch.Tensor:
        """Send the rows the batch's tables gained; returns its slot ids on the device,
        (pad_to or B,) int64, padding rows slot 0.

        `fresh`: requests whose tables are new in this job (`Job.fresh`): written from row 0.
        A request the store has not seen is written whole too. A table shorter than what the
        store holds of it, not named fresh, is refused (ValueError, the store unchanged): the
        scheduler names every new table, so a shorter one means a lost `fresh`."""
        n = len(seqs)
        total = pad_to if pad_to is not None else n
        if total < n:
            raise ValueError(f"cannot pad a batch of {n} sequences to {total}")
        named = set(fresh)
        for s in seqs:
            held = self._sent.get(s.request_id, 0)
            if s.request_id not in named and held > s.block_table.shape[0]:
                raise ValueError(
                    f"{s.request_id}: its block table shrank from {held} to "
                    f"{s.block_table.shape[0]} rows in a job that does not name it fresh"
                )
        for rid in named:
            if rid in self._sent:
                self._sent[rid] = 0
        width = max((s.block_table.shape[0] for s in seqs), default=0)
        slots = [self._slot_of(s.request_id) for s in seqs]
        self._reserve(len(self._dirty), width)
        parts: list[np.ndarray] = []  # per sequence: its rows to write, zeros past its table
        at_slot: list[np.ndarray] = []
        at_row: list[np.ndarray] = []
        for s, slot in zip(seqs, slots, strict=True):
            table, rid = s.block_table, s.request_id
            rows = table.shape[0]
            sent = self._sent[rid]
            end = max(rows, self._dirty[slot]) if sent == 0 else rows
            if end > sent:
                chunk = np.zeros((end - sent, *self.row_shape), dtype=np.int64)
                chunk[: rows - sent] = table[sent:]
                parts.append(chunk)
                at_slot.append(np.full(end - sent, slot, dtype=np.int64))
                at_row.append(np.arange(sent, end, dtype=np.int64))
            self._sent[rid] = rows
            if sent == 0:
                self._dirty[slot] = rows
            else:
                self._dirty[slot] = max(self._dirty[slot], rows)
        ids = np.zeros(total, dtype=np.int64)
        ids[:n] = slots
        m = sum(len(r) for r in at_row)
        packed = np.concatenate(
            [ids, *at_slot, *at_row, *(p.reshape(-1) for p in parts)]
        )  # one host-to-device copy for the whole job
        on_device = torch.from_numpy(packed).to(self.device, non_blocking=True)
        if m:
            where = on_device[total : total + 2 * m].view(2, m)
            rows_dev = on_device[total + 2 * m :].view(m, *self.row_shape)
            self.tables.index_put_((where[0], where[1]), rows_dev)
        return on_device[:total]

    def gather(
        self, slot_ids: torch.Tensor, width: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(len(slot_ids), width, layers, kv_heads) int64: the slots' tables padded with
        block 0, `pad_tables`' layout, on the device (into `out` when given)."""
        self._reserve(len(self._dirty), width)
        view = self.tables[:, :width]
        if out is None:
            return view.index_select(0, slot_ids)
        return torch.index_select(view, 0, slot_ids, out=out)

    # ---- slots and growth ------------------------------------------------------------------
    def _slot_of(self, rid: str) -> int:
        slot = self._slot.get(rid)
        if slot is None:
            if not self._free:
                self._reserve(2 * len(self._dirty), self.tables.shape[1])
            slot = self._slot[rid] = self._free.pop()
            self._sent[rid] = 0
        return slot

    def _reserve(self, slots: int, rows: int) -> None:
        """Make room for `slots` slots of `rows` rows, copying what is there: rows at least
        double, so a table growing one row at a time costs few growths."""
        have_slots, have_rows = self.tables.shape[:2]
        if slots <= have_slots and rows <= have_rows:
            return
        if rows > have_rows:
            rows = max(rows, 2 * have_rows)
        if self.device.type == "cuda":  # another stream may still read or write the old one
            torch.cuda.synchronize(self.device)
        grown = torch.zeros(
            (max(slots, have_slots), max(rows, have_rows), *self.row_shape),
            dtype=torch.int64,
            device=self.device,
        )
        grown[:have_slots, :have_rows] = self.tables
        self.tables = grown
        self._free = list(range(max(slots, have_slots) - 1, have_slots - 1, -1)) + self._free
        self._dirty += [0] * (grown.shape[0] - have_slots)
