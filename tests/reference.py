"""Slow, readable float64 reference of the X-KD loss, written from XKD_METHOD.md alone.

One token at a time, full vocabulary, plain PyTorch, no code shared with axolotl_xkd. Tests and
benchmarks compare the library against it. Differentiable, so gradients can be compared too.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for probability vectors; 0 log 0 = 0."""
    total = p.new_zeros(())
    for pc, qc in zip(p, q):
        if pc > 0:
            total = total + pc * (torch.log(pc) - torch.log(qc))
    return total


def divergence(name: str, p_t: torch.Tensor, pi: torch.Tensor, beta: float, skew_alpha: float) -> torch.Tensor:
    """D between teacher p_T and student pi, both probability vectors over the same categories."""
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return kl(p_t, pi)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return kl(pi, p_t)
    if name == "jsd":
        m = beta * p_t + (1 - beta) * pi
        return beta * kl(p_t, m) + (1 - beta) * kl(pi, m)
    if name == "skew_forward_kl":
        return kl(p_t, skew_alpha * p_t + (1 - skew_alpha) * pi)
    if name == "skew_reverse_kl":
        return kl(pi, skew_alpha * pi + (1 - skew_alpha) * p_t)
    if name == "tvd":
        return 0.5 * (p_t - pi).abs().sum()
    raise ValueError(name)


def teacher_and_student(z: torch.Tensor, tau: float, teacher: dict, b: int, i: int, tail: bool):
    """(p_T, pi, ids) over the compared categories; ids is None for the full vocabulary."""
    pi_full = torch.softmax(z / tau, dim=0)
    if teacher["kind"] == "dense":
        return torch.softmax(teacher["logits"][b, i].double() / tau, dim=0), pi_full, None
    ids, lps = [], []
    for tok, lp in zip(teacher["ids"][b, i].tolist(), teacher["logprobs"][b, i].double()):
        if math.isfinite(float(lp)):
            ids.append(tok)
            lps.append(lp)
    lps_t = torch.stack(lps) if lps else z.new_zeros(0)
    pi_k = pi_full[ids] if ids else z.new_zeros(0)
    if tail:
        t_tail = torch.clamp(1 - lps_t.exp().sum(), min=0.0)
        t_cats = torch.cat([lps_t, torch.log(t_tail).reshape(1)])
        p_t = torch.softmax(t_cats / tau, dim=0)
        rest = [t for t in range(z.shape[0]) if t not in ids]  # summed, not 1 - sum: exact when k is near V
        pi = torch.cat([pi_k, pi_full[rest].sum().reshape(1)])
    else:
        p_t = torch.softmax(lps_t / tau, dim=0)
        pi = pi_k / pi_k.sum()
    return p_t, pi, ids


def q_table(z: torch.Tensor, q_form: str, tau: float, ava_alpha: float) -> torch.Tensor:
    """Q(s, .) over the vocabulary."""
    if q_form == "logits":
        return z / tau
    if q_form == "logprobs":
        return torch.log_softmax(z / tau, dim=0)
    return torch.log_softmax(ava_alpha * torch.softmax(z / tau, dim=0), dim=0)


TAIL_FLOOR = 2.0**-11  # the spec's floor on the tail probability of td_target teacher_logprob


def q_of(z, action, hp, teacher, b, i):
    """Q(s_i, a_i) or, with td_target teacher_expected, its expectation under the teacher."""
    q = q_table(z, hp["q_form"], hp["temperature"], hp["ava_alpha"])
    if hp["td_target"] in ("observed", "soft"):
        return q[action]
    p_t, _pi, ids = teacher_and_student(z, hp["temperature"], teacher, b, i, hp["topk_tail"])
    if ids is None:
        return (p_t * q).sum()
    value = sum(p_t[j] * q[tok] for j, tok in enumerate(ids)) if ids else z.new_zeros(())
    if hp["topk_tail"]:
        pi_full = torch.softmax(z / hp["temperature"], dim=0)
        rest = [t for t in range(z.shape[0]) if t not in ids]
        w = pi_full[rest]
        value = value + p_t[-1] * (w * q[rest]).sum() / w.sum()
    return value


def teacher_logprob(z, action, hp, teacher, b, i):
    """log p_T(a_i | s_i) at temperature tau; top-k: the action's category, else the (floored) tail spread
    uniformly over the tokens outside the top k."""
    p_t, _pi, ids = teacher_and_student(z, hp["temperature"], teacher, b, i, hp["topk_tail"])
    if ids is None:
        return torch.log(p_t[action])
    if action in ids:
        return torch.log(p_t[ids.index(action)])
    tail = float(p_t[-1]) if hp["topk_tail"] else 0.0
    return z.new_tensor(math.log(max(tail, TAIL_FLOOR) / (z.shape[0] - len(ids))))


def td_of(logits, a, a_next, hp, teacher, b, i):
    """TD_i; a_next is None where s'_i is terminal."""
    z = logits[b, i]
    if hp["td_target"] == "teacher_logprob":
        return teacher_logprob(z, a, hp, teacher, b, i).detach()
    td = q_of(z, a, hp, teacher, b, i)
    if a_next is None:
        return td
    z_next = logits[b, i + 1]
    if hp["td_target"] == "soft":  # V(s') = log sum_a exp Q(s', a)
        later = torch.logsumexp(q_table(z_next, hp["q_form"], hp["temperature"], hp["ava_alpha"]), dim=0)
    else:
        later = q_of(z_next, a_next, hp, teacher, b, i + 1)
    return td - hp["gamma"] * later


def reference_xkd(logits, labels, *, teacher, mu, log_sigma, hp, position_ids=None, eos=None):
    """Sum of l_i over response tokens and the per-term sums, float64."""
    B, T, _ = logits.shape
    logits = logits.double()
    tau = hp["temperature"]

    def action_at(b, i):
        """a_i = u_{i+1}, or None if position i has no response action."""
        if i + 1 >= T or int(labels[b, i + 1]) == -100:
            return None
        if position_ids is not None and int(position_ids[b, i + 1]) == 0:
            return None
        return int(labels[b, i + 1])

    total = logits.new_zeros(())
    terms = {k: logits.new_zeros(()) for k in ("divergence", "ce", "kl_prior", "td_nll")}
    count = 0
    for b in range(B):
        for i in range(T):
            a = action_at(b, i)
            if a is None:
                continue
            count += 1
            z = logits[b, i]
            if hp["divergence"] == "sequence":
                d = -torch.log_softmax(z / tau, dim=0)[a]
            else:
                p_t, pi, _ = teacher_and_student(z, tau, teacher, b, i, hp["topk_tail"])
                d = divergence(hp["divergence"], p_t, pi, hp["beta"], hp["skew_alpha"])
                if hp["scale_by_tau_squared"]:
                    d = d * tau**2
            ce = -torch.log_softmax(z, dim=0)[a]
            r = i + 1 if hp["reward_input"] == "next_state" else i
            mu_i, log_s = mu[b, r].double(), log_sigma[b, r].double()
            s, prior = log_s.exp(), hp["prior_std"]
            kl_prior = math.log(prior) - log_s + (s**2 + mu_i**2) / (2 * prior**2) - 0.5
            a_next = action_at(b, i + 1) if a != eos else None
            td = td_of(logits, a, a_next, hp, teacher, b, i)
            td_nll = 0.5 * LOG_2PI + log_s + (td - mu_i) ** 2 / (2 * s**2)
            total = total + hp["alpha_kd"] * d + hp["alpha_ce"] * ce + hp["reward_kl_weight"] * kl_prior
            total = total + hp["td_weight"] * td_nll
            for key, value in zip(terms, (d, ce, kl_prior, td_nll)):
                terms[key] = terms[key] + value
    return total, terms, count


def aligned_teacher_record(student, teacher, teacher_logits, text: str, student_ids: list[int], *,
                           server_top_k: int | None = None, parts: list[str] | None = None) -> list[dict]:
    """Cross-tokenizer reference (docs/cross_tokenizer.md, the prefix projection), one student position at a time,
    for ASCII `text`: {student id: log p~_T} at each position of `student_ids` (the student's tokens of `text`, then
    its EOS), {} where no teacher position is read. Written from offsets and token strings (`Ġ` and `▁` read as a
    space), not from the library's byte pieces or tables. `teacher_logits` (T_T, V_T) are the teacher's on
    `teacher(text)`, or with `parts` (texts that join to `text`, the prompt and the response the student tokenized
    apart) on the teacher's ids of each part tokenized on its own, in order. With `server_top_k`, only what a teacher
    server sends: its top k and the teacher's next token (its EOS after the last).
    """
    def spelled(tokenizer, tid: int) -> str | None:
        token = tokenizer.convert_ids_to_tokens(tid)
        if tid in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}:
            return None
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return chr(int(token[3:5], 16))
        return token.replace("Ġ", " ").replace("▁", " ")

    student_of: dict[int, int] = {}
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        sid, tid = getattr(student, role), getattr(teacher, role)
        if sid is not None and tid is not None and tid not in student_of and sid not in student_of.values():
            student_of[tid] = sid
    by_string: dict[str, list[int]] = {}
    for sid in range(len(student)):
        if spelled(student, sid):
            by_string.setdefault(spelled(student, sid), []).append(sid)
    for tid in range(len(teacher)):
        free = [s for s in by_string.get(spelled(teacher, tid) or "", []) if s not in student_of.values()]
        if tid not in student_of and free:
            student_of[tid] = free[0]

    def longest(rest: str) -> int | None:
        """The student token the continuation starts with: the longest spelled prefix; a byte-fallback token only
        where no other token spells the same, then the lowest id."""
        best = None
        for sid in range(len(student)):
            piece = spelled(student, sid)
            if not piece or not rest.startswith(piece):
                continue
            key = (len(piece), not student.convert_ids_to_tokens(sid).startswith("<0x"), -sid)
            if best is None or key > best[0]:
                best = (key, sid)
        return None if best is None else best[1]

    parts = parts or [text]
    part_starts = {sum(map(len, parts[:k])) for k in range(len(parts))}

    def dummy_space(tokenizer, tid: int, start: int, end: int) -> bool:
        """Whether the token's string carries a space that is not in the text (a sentencepiece dummy prefix, at the
        start of a part)."""
        piece = spelled(tokenizer, tid)
        return (piece is not None and piece == " " + text[start:end] and start in part_starts
                and (start == 0 or text[start - 1] != " "))

    s_offsets = student(text, return_offsets_mapping=True)["offset_mapping"]
    s_offsets = s_offsets + [(len(text), len(text))] * (len(student_ids) - len(s_offsets))
    s_ends = [max(end for _, end in s_offsets[: i + 1]) for i in range(len(s_offsets))]
    t_ids, t_offsets = [], []
    for k, part in enumerate(parts):
        encoded = teacher(part, return_offsets_mapping=True, add_special_tokens=k == 0)
        base = sum(map(len, parts[:k]))
        t_ids += encoded["input_ids"]
        t_offsets += [(start + base, end + base) for start, end in encoded["offset_mapping"]]
    t_ends = [max(end for _, end in t_offsets[: j + 1]) for j in range(len(t_offsets))]
    records = []
    for i, end in enumerate(s_ends):
        js = [j for j, e in enumerate(t_ends) if e <= end]
        if not js:
            records.append({})
            continue
        j = js[-1]
        space_t = j + 1 < len(t_ids) and dummy_space(teacher, t_ids[j + 1], *t_offsets[j + 1])
        space_s = i + 1 < len(student_ids) and i + 1 < len(s_offsets) and dummy_space(
            student, student_ids[i + 1], *s_offsets[i + 1])
        r = " " * space_t + text[t_ends[j]: end]
        if space_s and not r:  # only the student writes its dummy space: each teacher token counts after a space
            lp = torch.log_softmax(teacher_logits[j].double(), dim=0)
            mass = {}
            for t in range(len(teacher)):
                target = longest(" " + (spelled(teacher, t) or ""))
                if target is not None:
                    mass[target] = mass.get(target, 0.0) + math.exp(lp[t])
            records.append({sid: math.log(m) for sid, m in mass.items() if m > 0})
            continue
        if len(r) == space_s:  # both sides write their dummy space here: nothing of the next token is written yet
            r, space_s = "", 0
        lp = torch.log_softmax(teacher_logits[j].double(), dim=0)
        sent = range(len(teacher))
        if server_top_k is not None:
            following = [*t_ids, teacher.eos_token_id][j + 1]
            sent = {*lp.topk(server_top_k).indices.tolist(), following}
        mass: dict[int, float] = {}
        norm = 0.0
        for t in sent:
            piece = spelled(teacher, t)
            if r and (piece is None or not piece.startswith(r)):
                continue
            norm += math.exp(lp[t])
            if not r and t in student_of:
                target = student_of[t]
            else:
                rest = (piece or "")[len(r) - space_s:]
                target = longest(rest) if rest else None
            if target is not None:
                mass[target] = mass.get(target, 0.0) + math.exp(lp[t])
        scale = norm if r else 1.0
        records.append({sid: math.log(m / scale) for sid, m in mass.items() if m > 0})
    return records


def mixture_reference(teachers: list[dict], weights: list[float], mixture: str, *, route=None, next_ids=None,
                      vocab_size: int, score: str = "logprob", temperature: float = 1.0):
    """Per position (b, i), the mixed teacher {token: probability} and the weights {teacher: W}, one position at a
    time in float64 (docs/teachers.md#many-teachers). A teacher is {"dense": (B, T, V) logits} or {"ids", "logprobs"}
    (B, T, k) with -inf for an empty slot; a top-k teacher lists p_j(u) for its ids only (0 elsewhere, the rest its
    tail), a position with no entry has no distribution."""
    def dist(t, b, i):
        if "dense" in t:
            p = torch.softmax(t["dense"][b, i].double(), -1)
            return {u: float(p[u]) for u in range(vocab_size)}
        return {int(u): math.exp(float(lp)) for u, lp in zip(t["ids"][b, i], t["logprobs"][b, i])
                if math.isfinite(float(lp))}

    def log_p(d, u):  # the tail spread evenly over the unlisted tokens (with the loss's floor)
        if u in d:
            return math.log(d[u])
        tail = max(1 - sum(d.values()), 2.0**-11)
        return math.log(tail) - math.log(max(vocab_size - len(d), 1))

    def neg_h(d, dense):
        listed = sum(p * math.log(p) for p in d.values() if p > 0)
        tail = 0.0 if dense else max(1 - sum(d.values()), 0.0)
        return listed + (tail * math.log(tail) if tail > 0 else 0.0)

    shape = next(iter(teachers[0].values())).shape[:2]
    out = {}
    for b in range(shape[0]):
        for i in range(shape[1]):
            dists = [dist(t, b, i) for t in teachers]
            have = [bool(d) for d in dists]
            if mixture == "route":
                raw = [0.0 if j == int(route[b, i]) else -math.inf for j in range(len(teachers))]
            elif mixture == "weighted":
                raw = [math.log(w) for w in weights]
            else:
                raw = [math.log(w) + (log_p(d, int(next_ids[b, i])) if score == "logprob" else
                                      neg_h(d, "dense" in t)) / temperature
                       for w, d, t in zip(weights, dists, teachers)]
            raw = [r if h else -math.inf for r, h in zip(raw, have)]
            top = max(raw)
            if top == -math.inf:
                out[b, i] = ({}, [0.0] * len(teachers))
                continue
            w = [math.exp(r - top) for r in raw]
            w = [x / sum(w) for x in w]
            mixed: dict[int, float] = {}
            for wj, d in zip(w, dists):
                for u, p in d.items() if wj > 0 else ():
                    mixed[u] = mixed.get(u, 0.0) + wj * p
            out[b, i] = (mixed, w)
    return out
