"""The prefix projection: a teacher's next-token distributions over its own tokens, at the student positions the
alignment found, turned into a top-k signal in student ids, with the observed path's mass on the student's own
next token (docs/cross_tokenizer.md).

Imports torch, the token bytes and the loss's tail floor, precision policy and dense hidden signal; knows nothing of
the trainer, Axolotl or the schema.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from axolotl_xkd.cross_tokenizer.token_bytes import VocabMap
from axolotl_xkd.losses.categories import TAIL_FLOOR
from axolotl_xkd.losses.precision import upcast
from axolotl_xkd.losses.signal import DenseHiddenSignal

if TYPE_CHECKING:
    from axolotl_xkd.cross_tokenizer.alignment import AlignedSegment

@dataclass(frozen=True)
class ProjectionTables:
    """The projection's index tables, on one device. By teacher id: `rank` (position in byte order), `widths`
    (max(|beta(t)|, 1)), `starts` (where t's columns begin in `table`), `whole` (column 0: the student token where r
    is empty, -1: none); `table` the flat columns; `order` teacher ids by rank; `sources`, `targets` the teacher ids
    with a column-0 student token and that token; `teacher_of` student id -> teacher id where the map is one-to-one;
    `spaced` the student token that a space and t's bytes start with (column -1: where only the student writes a
    dummy-prefix space)."""

    rank: Tensor
    widths: Tensor
    starts: Tensor
    table: Tensor
    order: Tensor
    whole: Tensor
    sources: Tensor
    targets: Tensor
    teacher_of: Tensor
    spaced: Tensor


class Projection:
    """The teacher's vocabulary read for the prefix projection: its tokens sorted by their bytes (the tokens that start
    with r are one run of that order) and, for each teacher token t and byte offset o < |beta(t)|, the student token
    that beta(t)[o:] starts with: the longest student token that is a prefix of it (among student tokens of the same
    bytes, one that is not a byte-fallback token `<0xHH>`, then the lowest id). Column 0 is the vocabulary map where t
    has a twin (special tokens by role)."""

    def __init__(self, student_pieces: list[bytes | None], teacher_pieces: list[bytes | None], vocab: VocabMap,
                 fallback: set[int]) -> None:
        self.student_size = vocab.student_size
        teacher = [piece or b"" for piece in teacher_pieces]
        trie: dict = {}
        for sid in sorted((sid for sid, piece in enumerate(student_pieces) if piece), key=lambda s: (s in fallback, s)):
            node = trie
            for byte in student_pieces[sid]:
                node = node.setdefault(byte, {})
            node.setdefault(-1, sid)
        student_of = vocab.student_ids.tolist()
        widths = [max(len(piece), 1) for piece in teacher]
        table: list[int] = []
        for tid, piece in enumerate(teacher):
            table.append(student_of[tid] if student_of[tid] >= 0 else _longest(trie, piece, 0))
            table.extend(_longest(trie, piece, o) for o in range(1, len(piece)))
        order = sorted(range(len(teacher)), key=teacher.__getitem__)
        self.sorted_pieces = [teacher[t] for t in order]
        rank = [0] * len(teacher)
        for position, tid in enumerate(order):
            rank[tid] = position
        widths_t = torch.tensor(widths, dtype=torch.long)
        starts = torch.cumsum(widths_t, 0) - widths_t
        table_t = torch.tensor(table, dtype=torch.long)
        whole = table_t[starts]
        sources = (whole >= 0).nonzero().squeeze(-1)
        targets = whole[sources]
        self.one_to_one = targets.unique().numel() == targets.numel()  # no two teacher tokens share a student token
        teacher_of = torch.full((self.student_size,), -1, dtype=torch.long)
        if self.one_to_one:
            teacher_of[targets] = sources
        self._tables = {torch.device("cpu"): ProjectionTables(
            rank=torch.tensor(rank, dtype=torch.long), widths=widths_t, starts=starts, table=table_t,
            order=torch.tensor(order, dtype=torch.long), whole=whole, sources=sources, targets=targets,
            teacher_of=teacher_of, spaced=torch.tensor([_longest(trie, b" " + piece, 0) for piece in teacher]))}

    def tables(self, device: torch.device) -> ProjectionTables:
        """The index tables on `device`, copied there once."""
        if device not in self._tables:
            cpu = self._tables[torch.device("cpu")]
            self._tables[device] = ProjectionTables(**{f.name: getattr(cpu, f.name).to(device) for f in fields(cpu)})
        return self._tables[device]

    def run(self, partial: bytes) -> tuple[int, int]:
        """The ranks [lo, hi) of the teacher tokens whose bytes start with `partial`."""
        lo = bisect_left(self.sorted_pieces, partial)
        stop = partial.rstrip(b"\xff")
        if not stop:
            return lo, len(self.sorted_pieces)
        return lo, bisect_left(self.sorted_pieces, stop[:-1] + bytes([stop[-1] + 1]), lo)


def _longest(trie: dict, piece: bytes, offset: int) -> int:
    """The student id of the longest student token that piece[offset:] starts with (-1: none)."""
    found, node = -1, trie
    for byte in piece[offset:]:
        node = node.get(byte)
        if node is None:
            break
        found = node.get(-1, found)
    return found


class _Entries(NamedTuple):
    """How `project` reads its entries' log-probs: `read(rows)` gives the rows' log-probs, (n, width), in `dtype` on
    `device`."""

    read: Callable[[Tensor], Tensor]
    width: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, entry_logprobs: Tensor | DenseHiddenSignal) -> _Entries:
        """A tensor is indexed; a teacher's hidden states and output layer form each block's log-probs when it is
        read (`DenseHiddenSignal.log_probs`), as the fused loss forms the teacher's logits."""
        if isinstance(entry_logprobs, DenseHiddenSignal):
            dtype = upcast(entry_logprobs.hidden.new_zeros(())).dtype
            return cls(entry_logprobs.log_probs, entry_logprobs.vocab_size, dtype, entry_logprobs.hidden.device)
        return cls(entry_logprobs.__getitem__, entry_logprobs.shape[-1], entry_logprobs.dtype, entry_logprobs.device)


def path_rows(segments: list[AlignedSegment]) -> list[tuple[int, int]]:
    """(segment index, teacher position) of every observed-path factor, in the order `project` reads them after
    the rows of the student positions."""
    return [(n, l) for n, segment in enumerate(segments) for path in segment.path_positions() for l in path]


@dataclass(frozen=True)
class _Plan:
    """What `project` reads of the segments, as tensors over the P student positions: the run of teacher tokens
    that start with r (ranks [lows, highs)), the table column, whether r is not empty (`inside`), the teacher's own
    next token (`firsts`) and whether u_{i+1} reaches past it (`beyond`); over the X path factors: the position each
    belongs to (`owners`), the teacher token whose log-prob it reads (`tokens`, -1 for a tail) or the run of the
    tokens that start with the tail q (`tail_lows`, `tail_highs`)."""

    lows: Tensor
    highs: Tensor
    columns: Tensor
    inside: Tensor
    firsts: Tensor
    beyond: Tensor
    owners: Tensor
    tokens: Tensor
    tail_lows: Tensor
    tail_highs: Tensor

    @classmethod
    def of(cls, segments: list[AlignedSegment], projection: Projection, device: torch.device) -> _Plan:
        partials = [r for segment in segments for r in segment.partials]
        position = [(segment, j, m, q) for segment in segments
                    for j, m, q in zip(segment.teacher_positions, segment.path_ends, segment.tails)]
        owners, tokens, tails = [], [], []
        for owner, (segment, j, m, q) in enumerate(position):
            for l in range(j + 1, m):
                owners.append(owner)
                tokens.append(segment.teacher_ids[l + 1])
                tails.append(b"")
            if m > j and q:
                owners.append(owner)
                tokens.append(-1)
                tails.append(q)

        def tensor(values: list, dtype=torch.long) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        runs = tensor([projection.run(r) for r in partials]).reshape(-1, 2)
        tail_runs = tensor([projection.run(q) if q else (0, 0) for q in tails]).reshape(-1, 2)
        return cls(lows=runs[:, 0], highs=runs[:, 1],
                   columns=tensor([c for segment in segments for c in segment.columns]),
                   inside=tensor([bool(r) for r in partials], torch.bool),
                   firsts=tensor([f for segment in segments for f in segment.firsts]),
                   beyond=tensor([m > j for _, j, m, _ in position], torch.bool), owners=tensor(owners),
                   tokens=tensor(tokens), tail_lows=tail_runs[:, 0], tail_highs=tail_runs[:, 1])


def project(segments: list[AlignedSegment], entry_ids: Tensor | None, entry_logprobs: Tensor | DenseHiddenSignal,
            actions: Tensor, projection: Projection, *, top_k: int,
            chunk_elements: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """The teacher's entries at the segments' student positions, in order -> (ids, log-probs), (P, k + 1), over
    student ids, k = min(top_k, |V_S|).

    `entry_ids`, `entry_logprobs` (P + X, K): the teacher tokens and log-probs at each position's teacher position j
    (what a server sent; -inf pads), then at the X teacher positions of the observed paths (`path_rows`), or
    `entry_ids` None and `entry_logprobs` (P + X, V_T) over every teacher token in id order (a teacher run here:
    read through the projection's index tables, no (P, V_T) id tensor; or its hidden states there and its output layer
    cut to its vocabulary, a `DenseHiddenSignal` whose `log_probs` forms them a block of rows at a time). Each entry
    whose bytes start with the position's r gives its probability to the student token of the projection table;
    entries equal to r give theirs to no one (the tail). Where r is not empty the sums are divided by the mass of the
    entries that start with r. The teacher's own next token gives the student's own next
    token `actions` (P,) its mass along the observed path: all of it where it covers that token, else times the
    teacher's probability of its further tokens inside it (docs/cross_tokenizer.md). The record is the k most likely
    student tokens plus one slot for the student's own next token when it has mass outside those k (-inf otherwise,
    and in unused slots). Where student tokens are left outside the record, at least TAIL_FLOOR of the mass stays in
    the tail (the record is scaled down where it holds more): the projection gives exact zeros (inside a teacher
    token only some student tokens continue the text), and a tail of 0 against a student tail above 0 would make
    reverse KL infinite."""
    k = min(top_k, projection.student_size)
    size = projection.student_size
    entries = _Entries.of(entry_logprobs)
    device = entries.device
    tables = projection.tables(device)
    plan = _Plan.of(segments, projection, device)
    count = plan.columns.numel()
    actions = actions.to(device)
    first_sids = torch.where(plan.firsts >= 0, _column(plan.firsts.clamp(min=0), plan.columns, tables), -1)
    follows = (plan.firsts >= 0) & (actions >= 0) & ((first_sids != actions) | plan.beyond)
    path = _path_logprobs(plan, entry_ids, entries, tables, count)
    out_ids = torch.zeros((count, k + 1), dtype=torch.long, device=device)
    out_lps = torch.full((count, k + 1), -math.inf, dtype=entries.dtype, device=device)
    step = max(1, chunk_elements // max(entries.width, size, 1))
    one_to_one = entry_ids is None and projection.one_to_one and k <= entries.width
    spaced = plan.columns < 0  # only the student writes a dummy-prefix space: r empty, a space before each token
    groups = {"fast": ~plan.inside & ~spaced & ~follows & one_to_one, "inside": plan.inside, "spaced": spaced}
    groups["aligned"] = ~plan.inside & ~spaced & ~groups["fast"]
    for kind, chosen in groups.items():
        for rows in chosen.nonzero().squeeze(-1).split(step):
            if not rows.numel():
                continue
            own = actions[rows]
            if kind == "fast":
                out_ids[rows], out_lps[rows] = _record_one_to_one(entries.read(rows), own, k, tables, size)
                continue
            dense, first_lp = _dense(plan, rows, kind, entry_ids, entries, tables, size)
            moved = torch.where(follows[rows], first_lp + path[rows], -math.inf)
            out_ids[rows], out_lps[rows] = _record(_moved(dense, first_sids[rows], own, moved), own, k)
    return out_ids, out_lps


def _dense(plan: _Plan, rows: Tensor, kind: str, entry_ids: Tensor | None, entries: _Entries,
           tables: ProjectionTables, size: int) -> tuple[Tensor, Tensor]:
    """The projected distribution (n, V_S) at the student positions `rows` of one `kind` ("aligned": r empty,
    "spaced": r empty with the student's dummy-prefix space before each teacher token, "inside": r not empty), and
    the share of it (log) that the teacher's own next token carries (its probability over the mass of the run that
    starts with r)."""
    firsts = plan.firsts[rows].clamp(min=0)
    mapping = tables.spaced if kind == "spaced" else tables.whole
    if entry_ids is None:
        lp = entries.read(rows)
        first_lp = lp.gather(-1, firsts.unsqueeze(-1)).squeeze(-1)
        if kind != "inside":
            sources = tables.sources if kind == "aligned" else (mapping >= 0).nonzero().squeeze(-1)
            return _every_aligned(lp, sources, mapping[sources], size), first_lp
        dense, norm = _every_inside(lp, plan.columns[rows], plan.lows[rows], plan.highs[rows], tables, size)
        return dense, first_lp - norm
    t, lp = entry_ids[rows].long(), entries.read(rows)
    first_lp = _entry_logprob(t, lp, firsts)
    if kind == "inside":
        sid, lp, norm = _continuations(t, lp, plan.columns[rows], plan.lows[rows], plan.highs[rows], tables)
        norm = torch.where(torch.isfinite(norm), norm, 0.0)
    else:  # r empty: every entry, its whole bytes (after a space where spaced), no normalisation
        sid, norm = torch.where(torch.isfinite(lp), mapping[t], -1), torch.zeros_like(lp[:, 0])
    dense = _scatter_logsumexp(torch.where(sid >= 0, lp, -math.inf), sid.clamp(min=0), size)
    return dense - norm.unsqueeze(-1), first_lp - norm


def _entry_logprob(t: Tensor, lp: Tensor, token: Tensor) -> Tensor:
    """(n, K) entries -> the log-prob each row's entries give `token` (n,) (-inf where it was not sent)."""
    return torch.where(t == token.unsqueeze(-1), lp, -math.inf).amax(-1)


def _path_logprobs(plan: _Plan, entry_ids: Tensor | None, entries: _Entries,
                   tables: ProjectionTables, count: int) -> Tensor:
    """Per student position (P,): the log-probability of the observed path past the teacher's own next token: the
    sum over the X path rows (after the P rows) of the teacher's log-prob of its own next token there, or, at the
    tail, of the mass of the tokens that start with q (0 where the path has no factor)."""
    total = torch.zeros(count, dtype=entries.dtype, device=entries.device)
    factors = plan.owners.numel()
    if not factors:
        return total
    rows = torch.arange(count, count + factors, device=entries.device)
    step = max(1, (1 << 22) // max(entries.width, 1))
    values = []
    for part in torch.arange(factors, device=rows.device).split(step):
        tokens, lows, highs = plan.tokens[part], plan.tail_lows[part], plan.tail_highs[part]
        if entry_ids is None:
            lp = entries.read(rows[part])
            exact = lp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            run = _run_mass(lp, lows, highs, tables)
        else:
            t, lp = entry_ids[rows[part]].long(), entries.read(rows[part])
            exact = _entry_logprob(t, lp, tokens)
            ranks = tables.rank[t]
            run = torch.where((ranks >= lows[:, None]) & (ranks < highs[:, None]), lp, -math.inf).logsumexp(-1)
        values.append(torch.where(tokens >= 0, exact, run))
    return total.index_add_(0, plan.owners, torch.cat(values))


def _run_mass(lp: Tensor, lows: Tensor, highs: Tensor, tables: ProjectionTables) -> Tensor:
    """Rows over every teacher token (n, V_T) -> the log of the mass of the tokens of ranks [lows, highs) (n,)."""
    row, _, values = _run_entries(lp, lows, highs, tables)
    peak = values.new_full((lp.shape[0],), -math.inf).scatter_reduce(0, row, values, "amax")
    safe = torch.where(torch.isfinite(peak), peak, 0.0)
    total = values.new_zeros(lp.shape[0]).index_add_(0, row, (values - safe[row]).exp())
    return torch.where(torch.isfinite(peak), safe + total.log(), -math.inf)


def _moved(dense: Tensor, sources: Tensor, own: Tensor, mass: Tensor) -> Tensor:
    """The projected distribution (n, V_S) with `mass` (n,) (log; -inf: none) moved from student token `sources`
    (-1: from the tail) to `own`: the observed path's share of the teacher's own next token."""
    rows = torch.arange(dense.shape[0], device=dense.device)
    moving = torch.isfinite(mass) & (own >= 0) & (sources != own)
    if not bool(moving.any()):
        return dense
    rows, sources, own, mass = rows[moving], sources[moving], own[moving], mass[moving]
    taken = sources >= 0
    held = dense[rows[taken], sources[taken]]
    share = torch.exp(mass[taken] - held)  # of the source's mass; within rounding of 1 where it was all on the path
    left = held + torch.log1p(-share.clamp(max=1.0))
    dense[rows[taken], sources[taken]] = torch.where(share >= 1 - 64 * torch.finfo(held.dtype).eps, -math.inf, left)
    dense[rows, own] = torch.logaddexp(dense[rows, own], mass)
    return dense


def _every_aligned(lp: Tensor, sources: Tensor, targets: Tensor, size: int) -> Tensor:
    """Rows with r empty over every teacher token (n, V_T) -> (n, V_S): each student token's teacher mass (teacher
    tokens `sources` give theirs to `targets`), summed relative to the row's peak."""
    peak = lp.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    total = lp.new_zeros((lp.shape[0], size)).index_add_(1, targets, (lp[:, sources] - peak).exp())
    return total.log() + peak


def _every_inside(lp: Tensor, columns: Tensor, lows: Tensor, highs: Tensor, tables: ProjectionTables,
                  size: int) -> tuple[Tensor, Tensor]:
    """Rows inside a teacher token over every teacher token (n, V_T) -> (n, V_S) and the log of the run's mass (n,):
    only the run of tokens that start with each row's r is read (ranks [lows, highs) of the sorted vocabulary),
    summed relative to the row's peak and divided by the run's mass."""
    n = lp.shape[0]
    row, t, values = _run_entries(lp, lows, highs, tables)
    peak = values.new_full((n,), -math.inf).scatter_reduce(0, row, values, "amax")
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    mass = (values - peak[row]).exp()
    norm = values.new_zeros(n).index_add_(0, row, mass)
    sid = _column(t, columns[row], tables)
    keep = sid >= 0
    total = values.new_zeros(n * size).index_add_(0, (row * size + sid)[keep], mass[keep])
    norm = norm.clamp(min=torch.finfo(norm.dtype).tiny)
    return (total.view(n, size) / norm.unsqueeze(-1)).log(), norm.log() + peak


def _run_entries(lp: Tensor, lows: Tensor, highs: Tensor, tables: ProjectionTables) -> tuple[Tensor, Tensor, Tensor]:
    """Rows over every teacher token (n, V_T) -> the entries of each row's run of ranks [lows, highs), flat: their
    row, teacher id and log-prob."""
    lengths = highs - lows
    row = torch.repeat_interleave(torch.arange(lp.shape[0], device=lp.device), lengths)
    offset = torch.arange(row.numel(), device=lp.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths,
                                                                                    lengths)
    t = tables.order[lows[row] + offset]
    return row, t, lp[row, t]


def _column(t: Tensor, columns: Tensor, tables: ProjectionTables) -> Tensor:
    """The student token that teacher token t's bytes from offset `columns` on start with (-1: none, or none left);
    at column -1, the one that a space and t's bytes start with."""
    inside = columns < tables.widths[t]
    at = tables.table[(tables.starts[t] + columns).clamp(min=0, max=tables.table.numel() - 1)]
    return torch.where(columns < 0, tables.spaced[t], torch.where(inside, at, -1))


def _continuations(t: Tensor, lp: Tensor, columns: Tensor, lows: Tensor, highs: Tensor,
                   tables: ProjectionTables) -> tuple[Tensor, Tensor, Tensor]:
    """Rows inside a teacher token: entries (n, K) that start with r (their rank in [lows, highs)) keep their
    log-probs and get the student token their rest starts with (-1: none, or nothing left); the log of the mass of
    the entries that start with r is the normaliser."""
    ranks = tables.rank[t]
    starting = (ranks >= lows[:, None]) & (ranks < highs[:, None]) & torch.isfinite(lp)
    lp = torch.where(starting, lp, -math.inf)
    sid = torch.where(starting, _column(t, columns[:, None].expand_as(t), tables), -1)
    return sid, lp, torch.logsumexp(lp, -1)


def _record(dense: Tensor, own: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Projected log-probs (n, V_S) -> the top k and the own-token slot (`_slots`)."""
    top = dense.topk(k, dim=-1)
    own_lp = dense.gather(-1, own.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return _slots(top.values, top.indices, own, own_lp, student_size=dense.shape[-1])


def _record_one_to_one(lp: Tensor, own: Tensor, k: int, tables: ProjectionTables,
                       size: int) -> tuple[Tensor, Tensor]:
    """Rows with r empty over every teacher token (n, V_T), the map one-to-one: the top k taken over the teacher's
    ids and renamed, with no (n, V_S) tensor; the same record as `_record` over the projected distribution."""
    mapped = tables.whole
    values = lp if tables.sources.numel() == mapped.numel() else lp.masked_fill(mapped < 0, -math.inf)
    top = values.topk(k, dim=-1)
    twin = tables.teacher_of[own.clamp(min=0)]
    own_lp = torch.where(twin >= 0, lp.gather(-1, twin.clamp(min=0).unsqueeze(-1)).squeeze(-1), -math.inf)
    return _slots(top.values, mapped[top.indices].clamp(min=0), own, own_lp, student_size=size)


def _slots(values: Tensor, ids: Tensor, own: Tensor, own_lp: Tensor, *, student_size: int) -> tuple[Tensor, Tensor]:
    """The top k (values, ids) and the own-token slot (own's log-prob where it is not among them), with TAIL_FLOOR
    left to the tail where student tokens are outside the record."""
    fresh = (own >= 0) & ~((ids == own.unsqueeze(-1)) & torch.isfinite(values)).any(-1)
    record = torch.cat([values, torch.where(fresh, own_lp, -math.inf).unsqueeze(-1)], -1)
    if values.shape[-1] < student_size:  # the tail holds student tokens: keep TAIL_FLOOR of the mass there
        covered = torch.logsumexp(record, -1, keepdim=True)
        record = record - (covered - math.log1p(-TAIL_FLOOR)).clamp(min=0.0)
    return torch.cat([ids, own.clamp(min=0).unsqueeze(-1)], -1), record


def _scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """(n, K) log-values grouped by `index` into (n, size): log sum exp of each group (-inf for none); exact (no
    exp/log round trip) for a group of one."""
    peak = values.new_full((values.shape[0], size), -math.inf).scatter_reduce(-1, index, values, "amax")
    shift = peak.gather(-1, index)
    safe = torch.where(torch.isfinite(shift), shift, 0.0)
    total = values.new_zeros((values.shape[0], size)).scatter_add(-1, index, (values - safe).exp())
    return torch.where(torch.isfinite(peak), peak + total.log(), -math.inf)
