"""Promotion in the MLflow model registry: move the alias ``champion`` only to a better model.

A candidate version and the current ``@champion`` are scored on the same held-out
shards, with their (EMA) registered weights, the same seed and the same number of
dequantization samples. The candidate wins only if its mean bits/dim is lower by more
than a margin: by default ``z`` standard errors of the paired per-image difference, so
that a gain inside the noise of the evaluation set is not a win. The figures are
written as tags on both versions. The previous champion keeps the alias ``previous``,
which ``rollback`` moves back.

MLflow has no compare-and-set, so the alias move runs under an advisory lock (a tag on
the registered model, set, left to settle, then read back), and the champion is read
again under the lock: if another promotion moved it meanwhile, the candidate is
compared with the new champion before anything changes.

The lock is the project's one lease (``orchestrator.core.lease``) stored in the tag
``OWNER:EXPIRY``. A heartbeat thread renews the expiry every third of the
lease while the holder works (a re-score of 50k images outlasts any fixed lease), and the
aliases move only if the lock is still held. Release is compare-and-delete: the tag is read
and deleted only if it still names this owner. MLflow offers no conditional delete, so a
window of one round trip remains between that read and the delete; another promotion can
take the lock inside it only if this holder's lease had already run out (its heartbeat
failing for a whole lease), and the alias move checks the lock first.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.core import lease, retry, storage
from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.redact import SPEC_TAG, redact
from orchestrator.evaluation.evaluate import Scores, per_image_bpd
from orchestrator.tracking import TrackingUnavailableError, check_reachable
from orchestrator.tracking.registry import ModelRegistry

log_ = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"
LOCK_TAG = "flowpp.promotion_lock"
_START_IT = "start it, or correct --tracking-uri / MLFLOW_TRACKING_URI"


class PromotionError(FlowppError):
    """Promotion cannot go ahead: the message says which version and why."""


class AlreadyChampionError(PromotionError, UserError):
    """The candidate asked for already holds @champion."""


class IncomparableError(PromotionError, UserError):
    """The candidate and the champion model other images (size, channels or bits): no comparison."""


def image_shape(model) -> dict[str, int]:
    """What a model's bits/dim is about: its images' side, channels and bits per value."""
    cfg = model.config
    return {"image_size": cfg.image_size, "channels": cfg.channels, "num_bits": cfg.num_bits}


def check_comparable(name: str, cand: str, cand_model, champion: str, champ_model) -> None:
    a, b = image_shape(cand_model), image_shape(champ_model)
    diffs = [f"{k} {a[k]} against {b[k]}" for k in a if a[k] != b[k]]
    if diffs:
        raise IncomparableError(
            f"{name}: v{cand} and the champion v{champion} model other images ({', '.join(diffs)}), so their "
            "bits/dim cannot be compared; register models of other images under another name "
            "(mlflow.registered_model)"
        )


@dataclass
class EvalSettings:
    data: str | None = None
    """Manifest URL of the held-out split (default: the candidate run's ``data.valid``)."""
    seed: int = 0
    samples: int = 1
    max_images: int = 0
    batch_size: int = 32
    options: storage.StorageOptions = field(default_factory=storage.StorageOptions)
    device: str = "cpu"
    """Where both models are scored (``cuda`` on a GPU machine: hours become minutes on 50k images)."""


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate_bpd: float
    champion_bpd: float | None = None
    gain: float | None = None
    """Champion bits/dim minus candidate bits/dim (positive: the candidate is better)."""
    margin: float | None = None
    n: int = 0


def decide(candidate: Scores, champion: Scores | None, margin: float | None = None, z: float = 2.0) -> Decision:
    """Promote iff the candidate beats the champion by more than the margin (the first valid one wins)."""
    cand = candidate.mean
    if not math.isfinite(cand):
        return Decision(False, f"the candidate's bits/dim is not finite ({cand})", cand, n=len(candidate.bpd))
    if champion is None:
        return Decision(True, "no champion yet: the first valid candidate is promoted", cand, n=len(candidate.bpd))
    if candidate.keys != champion.keys:
        raise PromotionError("candidate and champion were not scored on the same images")
    diff = champion.bpd - candidate.bpd  # per image, positive where the candidate is better
    n = len(diff)
    gain = float(diff.mean())
    spread = float(diff.std(ddof=1)) if n > 1 else 0.0
    bound = margin if margin is not None else z * spread / math.sqrt(n)
    how = f"fixed margin {bound:.4f}" if margin is not None else f"margin {bound:.4f} = {z:g} x s.e. over {n} images"
    if gain > bound:
        return Decision(True, f"better by {gain:.4f} bits/dim > {how}", cand, champion.mean, gain, bound, n)
    return Decision(False, f"not better by more than the margin: {gain:+.4f} bits/dim <= {how}", cand,
                    champion.mean, gain, bound, n)  # fmt: skip


def val_metric(reg: ModelRegistry, mv) -> float:
    """The version's validation bits/dim from training; a clear error if it never had one."""
    value = mv.tags.get("val_bpd")
    if value in (None, "", "nan"):
        value = reg.run_metric(mv.run_id, "val_bpd")
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise PromotionError(
            f"{reg.name} version {mv.version} has no val_bpd metric (its run {mv.run_id} never reported a "
            "validation figure): it is not a valid candidate"
        )
    return value


def data_url(reg: ModelRegistry, mv) -> str:
    # the spec's tag; runs logged before the spec moved to tags carry it as a param
    url = reg.run_tag(mv.run_id, SPEC_TAG + "data.valid") or reg.run_param(mv.run_id, "data.valid")
    if not url:
        raise PromotionError(
            f"{reg.name} version {mv.version}: its run records no data.valid; pass --data MANIFEST_URL"
        )
    return url


def evaluation_data(reg: ModelRegistry, cand, champ_mv) -> str:
    """Where a comparison scores, without ``--data``: the set the champion won on (its
    ``promotion.data`` tag), else its own run's validation split; the candidate's only when there
    is no champion. A candidate never chooses the data it is judged on."""
    if champ_mv is None:
        return data_url(reg, cand)
    return (champ_mv.tags or {}).get("promotion.data") or data_url(reg, champ_mv)


def scores(reg: ModelRegistry, version: str, settings: EvalSettings, role: str = "candidate", model=None) -> Scores:
    """Per-image bits/dim of ``version`` (``model``: it, loaded already), with a progress bar
    labelled ``role`` and the version."""
    assert settings.data is not None
    return per_image_bpd(
        model if model is not None else reg.load(version, settings.device),
        settings.data,
        settings.options,
        seed=settings.seed,
        samples=settings.samples,
        max_images=settings.max_images,
        batch_size=settings.batch_size,
        desc=f"{role} {reg.name} v{version}",
    )


class TagStore:
    """The promotion lock's record as the registered model's tag ``OWNER:EXPIRY`` (a lease store).
    The registry has no conditional writes: each change checks the tag by a read first, and the
    lease's settle-and-read-back decides a race (``atomic = False``). The version is the tag."""

    atomic = False

    def __init__(self, reg: ModelRegistry):
        self.reg, self.where = reg, f"{reg.name}'s promotion lock"

    def read(self) -> tuple[lease.Holder, str] | None:
        tag = self.reg.tags().get(LOCK_TAG) or ""
        owner, _, expires = tag.rpartition(":")
        try:
            return (lease.Holder(owner, float(expires)), tag) if owner else None
        except ValueError:
            return None  # a tag no promotion wrote: free

    def _check(self, version: str | None) -> None:
        found = self.read()
        if (found[1] if found else None) != version:
            raise storage.PreconditionFailed(f"{self.where}: the lock changed")

    def _write(self, holder: lease.Holder) -> str:
        tag = f"{holder.owner}:{holder.expires:.3f}"
        try:
            self.reg.set_tag(LOCK_TAG, tag)
        except TrackingUnavailableError:
            # two writers of a new tag at once: MLflow's SQL store inserts it twice and one insert
            # fails (a UNIQUE constraint). If another owner's tag is there now, that writer won.
            found = self.read()
            if found is None:
                raise
            if found[1] != tag:
                raise storage.PreconditionFailed(f"{self.where}: taken meanwhile by {found[0].owner}") from None
        return tag

    def create(self, holder: lease.Holder) -> str:
        self._check(None)
        return self._write(holder)

    def replace(self, holder: lease.Holder, version: str) -> str:
        self._check(version)
        return self._write(holder)

    def delete(self, version: str) -> None:
        self._check(version)
        self.reg.delete_tag(LOCK_TAG)


@contextmanager
def promotion_lock(reg: ModelRegistry, lease_s: float = 1800, settle_s: float = 1.0, timeout_s: float = 900):
    """An advisory lock on the registered model (the one lease of ``orchestrator.core.lease``),
    renewed while held; a holder that died frees it when its lease ends."""
    store, deadline = TagStore(reg), time.monotonic() + timeout_s
    while True:
        try:
            held = lease.acquire(store, lease_s, settle_s=settle_s)
            break
        except lease.LeaseHeld:
            if time.monotonic() > deadline:
                waited = f"{reg.name}: another promotion has held the lock for over {timeout_s:.0f} s"
                raise PromotionError(waited) from None
            time.sleep(0.2 + retry.jitter(0.3))
    try:
        yield held
    finally:
        held.release()


def break_lock(tracking_uri: str, name: str, log=print) -> str | None:
    """Delete the promotion lock whoever holds it (a far-future lease left by a broken client);
    the break is recorded on the registered model (``promotion.lock_broken``). Returns the tag
    that was there, or None."""
    reg = ModelRegistry(tracking_uri, name)
    tag = reg.tags().get(LOCK_TAG)
    if not tag:
        log(f"{name}: no promotion lock is held")
        return None
    reg.delete_tag(LOCK_TAG)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reg.set_tag("promotion.lock_broken", f"{when} by {lease.new_owner()}; it was {tag}")
    log(f"{name}: broke the promotion lock {tag!r} (recorded as the tag promotion.lock_broken)")
    return tag


def ensure_held(reg: ModelRegistry, held: lease.Lease) -> None:
    """Raise unless this promotion still holds the lock (checked before the aliases move)."""
    try:
        held.ensure_held()
    except lease.LeaseLost:
        raise PromotionError(f"{reg.name}: the promotion lock was lost (its lease ran out); nothing moved") from None


def promote(
    tracking_uri: str,
    name: str,
    version: str | None = None,
    settings: EvalSettings | None = None,
    margin: float | None = None,
    z: float = 2.0,
    dry_run: bool = False,
    log=print,
    lock_lease_s: float = 1800,
) -> Decision:
    """Compare ``version`` (default: the latest) with ``@champion``; move the aliases if it wins."""
    settings = settings or EvalSettings()
    check_reachable(tracking_uri, field="tracking URI", hint=_START_IT)  # now, not after MLflow's minutes of retries
    reg = ModelRegistry(tracking_uri, name)
    cand = reg.version(version) if version else reg.latest()
    val_metric(reg, cand)
    champion = reg.alias(CHAMPION)
    if champion == str(cand.version):
        raise AlreadyChampionError(f"{name} version {cand.version} is already the champion")
    champ_mv = reg.version(champion) if champion is not None else None
    if champ_mv is not None:
        val_metric(reg, champ_mv)
    if settings.data is None:  # the champion's evaluation set: a candidate never picks its own
        settings.data = evaluation_data(reg, cand, champ_mv)
    cand_model = reg.load(cand.version, settings.device)
    champ_model = reg.load(champion, settings.device) if champion else None
    if champion:
        check_comparable(name, cand.version, cand_model, champion, champ_model)
    who = f"v{champion}" if champion else "(none)"
    log(f"scoring {name} v{cand.version} and champion {who} on {redact(settings.data)} "
        f"(seed {settings.seed}, {settings.samples} dequantization sample(s))")  # fmt: skip
    cand_scores = scores(reg, cand.version, settings, model=cand_model)
    champ_scores = scores(reg, champion, settings, CHAMPION, model=champ_model) if champion else None
    decision = decide(cand_scores, champ_scores, margin, z)
    if dry_run:
        log(_summary(name, cand.version, champion, decision, dry_run=True))
        return decision
    with promotion_lock(reg, lease_s=lock_lease_s) as held:
        now = reg.alias(CHAMPION)
        if now != champion:  # another promotion moved it while we were scoring
            log(f"the champion changed from {champion} to {now} meanwhile; comparing with v{now}")
            champion = now
            champ_model = reg.load(champion, settings.device) if champion else None
            if champion:
                check_comparable(name, cand.version, cand_model, champion, champ_model)
            champ_scores = scores(reg, champion, settings, CHAMPION, model=champ_model) if champion else None
            decision = decide(cand_scores, champ_scores, margin, z)
        ensure_held(reg, held)  # a re-score may have outlasted a lease whose heartbeat failed
        _record(reg, cand.version, champion, decision, settings)
        if decision.promote:
            reg.set_alias(CHAMPION, str(cand.version))
            if champion is not None:
                reg.set_alias(PREVIOUS, champion)
    log(_summary(name, cand.version, champion, decision))
    return decision


def rollback(tracking_uri: str, name: str, log=print) -> str:
    """Move ``champion`` back to ``previous``; returns the restored version."""
    check_reachable(tracking_uri, field="tracking URI", hint=_START_IT)
    reg = ModelRegistry(tracking_uri, name)
    with promotion_lock(reg) as lease:
        previous, current = reg.alias(PREVIOUS), reg.alias(CHAMPION)
        lease.ensure_held()
        if previous is None:
            raise PromotionError(f"{name}: no @previous version to roll back to")
        reg.set_alias(CHAMPION, previous)
        reg.delete_alias(PREVIOUS)
        if current is not None:
            reg.tag_version(current, {"promotion.rolled_back": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log(f"rolled back {name}: champion v{current} -> v{previous}")
    return previous


def _record(reg: ModelRegistry, cand: str, champion: str | None, d: Decision, s: EvalSettings) -> None:
    common = {
        "promotion.data": redact(s.data or ""),
        "promotion.seed": s.seed,
        "promotion.samples": s.samples,
        "promotion.images": d.n,
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    reg.tag_version(cand, {
        **common,
        "promotion.bpd": f"{d.candidate_bpd:.6f}",
        "promotion.compared_with": champion or "none",
        "promotion.decision": "promoted" if d.promote else "refused",
        "promotion.reason": d.reason,
    })  # fmt: skip
    if champion is not None:
        reg.tag_version(champion, {**common, "promotion.bpd": f"{d.champion_bpd:.6f}", "promotion.compared_with": cand})


def _summary(name, cand, champion, d: Decision, dry_run: bool = False) -> str:
    figures = f"candidate v{cand}: {d.candidate_bpd:.4f} bits/dim"
    if champion is not None and d.champion_bpd is not None:
        figures += f", champion v{champion}: {d.champion_bpd:.4f} bits/dim"
    figures += f" ({d.n} images)"
    if dry_run:
        verdict = "would promote" if d.promote else "would refuse"
    elif d.promote:
        verdict = f"promoted: {name}@{CHAMPION} = v{cand}" + (f", @{PREVIOUS} = v{champion}" if champion else "")
    else:
        verdict = f"refused: {name}@{CHAMPION} stays " + (f"v{champion}" if champion else "unset")
    return f"{figures}; {d.reason} -> {verdict}"
