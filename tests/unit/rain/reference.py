"""A plain reference RAIN for the equivalence tests: the authors' code structure (node class with recursive
backup, getv / simg / group_getp), one sequence at a time, every logit from a full forward of the whole state,
no cache, no batching, no lockstep.

It shares no code with alignlab.rain except the sampling primitive (an inverse-CDF draw at a uniform) and the
uniforms' order, which both take from the prompt's generator: the rollout's one per token, L per proposal attempt
(drawn one attempt at a time here, as the code's loop samples), one per sampled commit.

The switches (child_order, eos_rule, proposal_temperature, proposal_attempts_per_candidate) are written as the
released code behaves: HH/main.py group_getp and search, adv/main.py's temperature and 2 * topk - 1 attempts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from alignlab.rain.proposal import sample_index


def topk_probs(logits, k, temperature=1.0):
    x = logits.double()
    probs = torch.softmax(x / temperature if temperature != 1.0 else x, dim=-1)
    if 0 < k < probs.numel():
        keep = torch.topk(probs, k).indices
        out = torch.zeros_like(probs)
        out[keep] = probs[keep]
        probs = out / out.sum()
    return probs


class RefNode:
    def __init__(self, parent, p, tokens, step):
        self.parent, self.p, self.tokens, self.step = parent, p, tokens, step
        self.children = {}  # insertion ordered
        self.n, self.fn, self.q, self.emb = 0, 0, 0.0, None
        self.ranked, self.raw = None, []

    def score(self, c):
        qh = 0 if self.n == 0 else (self.q + 1) / (2 + 1e-5)
        return qh + c * self.p * np.sqrt(self.parent.n) / (1 + self.n)

    def backup(self, v, path_texts, embed, gamma, thr, sim_on):
        self.n += 1
        self.fn += 1
        if self.parent is not None:
            e = embed(path_texts[0])
            self.emb = e.clone() if self.emb is None else self.emb + (e - self.emb) / self.fn
            for sib in self.parent.children.values():
                if sib is self or sib.emb is None or not sim_on:
                    continue
                cos = F.cosine_similarity(self.emb[None].float(), sib.emb[None].float()).item()
                if cos >= thr:
                    w = cos * gamma
                    before = sib.n
                    sib.n += w
                    sib.q = (sib.q * before + w * v) / sib.n
            self.parent.backup(v, path_texts[1:], embed, gamma, thr, sim_on)
        self.q += (v - self.q) / self.n


def ref_rain(prompt, *, lm, embed, codec, judge, P, rng, max_searches=None):
    """-> (answer ids, first root). lm(ids) -> logits [V]; embed(text) -> [D]; judge: a bound JudgeFormat."""
    eos = codec.eos_id
    prompt_ids = codec.encode(prompt)
    i = prompt.rfind(P.turn_marker)
    exchange = prompt[i:] if i >= 0 else prompt
    memo = {}

    def text_of(ans):
        return codec.decode(ans)

    cont = P.eos_rule == "continue"

    def ended(ans):
        if len(ans) >= P.max_new_tokens or (not cont and eos in ans):
            return True
        return any(s in text_of(ans) for s in P.stop_strings)

    def simg(ans):
        toks = []
        while True:
            full = ans + toks
            if len(full) >= P.max_new_tokens or eos in (toks[-1:] if cont else full):
                break
            t = text_of(full) or prompt
            if t[-1] in P.rollout_stops or any(s in text_of(full) for s in P.stop_strings):
                break
            probs = torch.softmax(lm(prompt_ids + full).double(), -1)
            toks.append(sample_index(probs, rng.random()))
        return toks

    def getv(ans):
        toks = simg(ans)
        resp = text_of(ans + toks)
        cuts = [k for s in P.stop_strings if (k := resp.find(s)) >= 0]
        resp = resp[: min(cuts)] if cuts else resp
        dialogue = exchange + resp
        if dialogue not in memo:
            votes = []
            for text, slot in judge.prompts(dialogue):
                lp = torch.log_softmax(lm(codec.encode(text)).float(), -1)
                good, bad = judge.letter_ids[slot], judge.letter_ids[1 - slot]
                votes.append(1 if lp[good] > lp[bad] else 0)
            memo[dialogue] = (sum(votes) / len(votes) - 0.5) * 2
        return memo[dialogue], toks

    def one_set(ans, L, row):
        """A greedy (row None) or sampled set: top-k at the proposal temperature, HH runs on through EOS."""
        seq, lp = [], 0.0
        for j in range(L):
            probs = topk_probs(lm(prompt_ids + ans + seq), P.top_k, P.proposal_temperature)
            tok = int(torch.argmax(probs)) if row is None else sample_index(probs, row[j])
            lp += math.log(probs[tok].item())
            seq.append(tok)
            if tok == eos and not cont:
                break
        return tuple(seq), math.exp(lp)

    def length(step):
        return P.token_set_lengths[min(step, len(P.token_set_lengths) - 1)]

    def expand(node, ans, is_root):
        L = length(node.step)
        if L == 1:
            logits = lm(prompt_ids + ans)
            probs = torch.softmax(logits.double(), -1)
            top = torch.topk(probs, max(P.n_candidates, P.dynamic_max_children))
            node.ranked = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            toks = [t for t, _ in node.ranked[: P.n_candidates]]
            if P.child_order == "token_id":  # np.where over the top-k mask: ascending ids
                toks = sorted(toks)
            tempered = topk_probs(logits, 0, P.proposal_temperature)
            acts = [(t,) for t in toks]
            raw = [tempered[t].item() for t in toks]
        else:
            greedy = one_set(ans, L, None)
            acts, raw = [greedy[0]], []
            for _ in range(P.proposal_attempts_per_candidate * P.n_candidates - 1):
                if len(raw) >= P.n_candidates - 1:
                    break
                s, p = one_set(ans, L, rng.random((1, L))[0])
                if s not in acts:
                    acts.append(s)
                    raw.append(p)
            g = greedy[1]
            if raw:
                g = max(min(g, sum(raw)), max(raw) + min(raw))
            raw = [g] + raw
        node.raw = list(raw)
        ps = np.array(raw) / sum(raw)
        if is_root:
            ps = 0.75 * ps + 0.25 / len(ps)
            ps = ps / ps.sum()
        for a, p in zip(acts, ps, strict=True):
            node.children[a] = RefNode(node, float(p), a, node.step + 1)

    def checkadd(node, ans, is_root):
        kids = list(node.children.values())
        if len(kids) < 2 or len(kids) >= P.dynamic_max_children or any(k.emb is None for k in kids):
            return
        var = torch.var(torch.stack([k.emb for k in kids]), dim=0)
        if not (
            torch.norm(var).item() < P.dynamic_var_coef * len(kids[0].tokens) and max(k.q for k in kids) < 0
        ):
            return
        # the node's level decides, as in expansion: under eos_rule=stop a multi-token level's first child may be
        # a set cut at EOS to one token (in the released HH code sets are never cut, so the two tests agree)
        if length(node.step) == 1:
            top = node.ranked[: len(kids) + 1]
            total = sum(p for _, p in top)
            new = [(t, p / total) for t, p in top if (t,) not in node.children]
            if not new:
                return
            a, p = (new[0][0],), new[0][1]
            raw = None
        else:
            L = length(node.step)
            greedy = kids[0].tokens
            for _ in range(2 * P.proposal_attempts_per_candidate - 1):
                a, raw = one_set(ans, L, rng.random((1, L))[0])
                if a != greedy:
                    break
            if a == greedy or a in node.children:
                return
            p = raw / (sum(node.raw) + raw)
            node.raw.append(raw)
        if is_root:
            p = 0.75 * p + 0.25 / (len(kids) + 1)
        node.children[a] = RefNode(node, p, a, node.step + 1)
        stats["adds"] += 1

    def search(root, answer):
        node, ans = root, list(answer)
        while node.children:
            if P.dynamic_addition:
                checkadd(node, ans, node is root)
            node = max(node.children.values(), key=lambda ch: ch.score(P.c))
            ans += node.tokens
        v, toks = getv(ans)
        if not (ended(ans) or (cont and node is not root and eos in node.tokens)):
            expand(node, ans, node is root)
        texts, suffix, cur = [], list(toks), node
        while cur is not root:
            suffix = list(cur.tokens) + suffix
            texts.append(text_of(suffix))
            cur = cur.parent
        node.backup(v, texts, embed, P.gamma, P.sim_threshold, P.similarity_update)

    def best(root):
        top = max(ch.n for ch in root.children.values())
        return max((ch for ch in root.children.values() if ch.n == top), key=lambda ch: ch.q)

    stats = {"adds": 0}
    root = first = RefNode(None, 0.0, (), 0)
    answer = []
    searches = 0
    while True:
        initi = root.fn
        for _ in range(initi, max(P.T, initi + 15)):
            search(root, answer)
            searches += 1
            b = best(root) if root.children else None
            if b is not None and b.fn > P.T_m and b.q > P.V:
                break
        if not root.children:
            break
        child = best(root)
        answer += child.tokens
        if ended(answer):
            break
        child.parent = None
        ps = np.array([c.p for c in child.children.values()])
        if len(ps):
            ps = 0.75 * ps + 0.25 / len(ps)
            ps = ps / ps.sum()
            for c, p in zip(child.children.values(), ps, strict=True):
                c.p = float(p)
        root = child
    return answer, first, stats
