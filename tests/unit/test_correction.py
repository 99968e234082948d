"""Correction policies: the action mask, the feature vector, the rules and the learned policy."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.correction import (
    ACTIONS,
    FEATURE_DIM,
    FEATURE_SCHEMA_VERSION,
    N_ACTIONS,
    CorrectiveAction,
    Decision,
    FailureContext,
    RulesPolicy,
    featurize,
    mask,
)
from controller.correction.features import ERROR_CLASSES, TYPE_BUCKETS
from controller.correction.learned import ActorCritic, LearnedPolicy, checkpoint_bytes, load_checkpoint
from controller.correction.rules import RULES_TABLE
from dagsmith.errors import ErrorClass

A = CorrectiveAction
ROOMY = FailureContext(
    "transient",
    "ml.infer",
    max_retries=3,
    max_surgeries=5,
    max_inserted=2,
    has_fallback=True,
    has_repair=True,
    has_tunable=True,
    optional=True,
)


def valid(ctx: FailureContext) -> set[CorrectiveAction]:
    return {a for a, ok in zip(ACTIONS, mask(ctx), strict=True) if ok}


contexts = st.builds(
    FailureContext,
    error_class=st.sampled_from([*ERROR_CLASSES, "cancelled", "quota_exceeded"]),
    task_type=st.sampled_from(["http.fetch", "json.parse", "ml.infer", "x"]),
    attempt=st.integers(1, 12),
    retries_used=st.integers(0, 5),
    max_retries=st.integers(0, 5),
    surgeries_used=st.integers(0, 12),
    max_surgeries=st.integers(0, 12),
    inserted_used=st.integers(0, 6),
    max_inserted=st.integers(0, 6),
    reward=st.floats(-3, 3),
    upstream_reward=st.none() | st.floats(-3, 3),
    duration_ratio=st.none() | st.floats(0, 50),
    executor_failure_rate=st.floats(-1, 2),
    has_fallback=st.booleans(),
    has_repair=st.booleans(),
    has_tunable=st.booleans(),
    optional=st.booleans(),
    progress=st.floats(0, 1),
    time_budget_used=st.none() | st.floats(0, 3),
    tried=st.tuples(*[st.integers(0, 9)] * N_ACTIONS),
)


# --- the mask ---


def test_action_order_is_fixed() -> None:
    assert [str(a) for a in ACTIONS] == [
        "retry_now",
        "retry_backoff",
        "retry_tuned",
        "reroute",
        "insert_repair",
        "skip",
        "abort",
    ]
    assert [a.ordinal for a in ACTIONS] == list(range(N_ACTIONS))


def test_everything_valid_with_room() -> None:
    assert valid(ROOMY) == set(ACTIONS)


def test_retries_need_retry_and_surgery_budget() -> None:
    no_retries = replace(ROOMY, retries_used=3)
    assert valid(no_retries) == {A.reroute, A.insert_repair, A.skip, A.abort}
    no_surgeries = replace(ROOMY, surgeries_used=5)
    assert valid(no_surgeries) == {A.skip, A.abort}


def test_plain_retries_are_invalid_for_non_retryable_classes() -> None:
    for cls in (ErrorClass.permanent, ErrorClass.invalid_input, ErrorClass.poison):
        v = valid(replace(ROOMY, error_class=str(cls)))
        assert A.retry_now not in v and A.retry_backoff not in v
        assert A.retry_tuned in v  # changed parameters may change the outcome


@pytest.mark.parametrize(
    ("change", "lost"),
    [
        ({"has_tunable": False}, A.retry_tuned),
        ({"has_fallback": False}, A.reroute),
        ({"has_repair": False}, A.insert_repair),
        ({"inserted_used": 2}, A.insert_repair),
        ({"optional": False}, A.skip),
    ],
)
def test_each_action_needs_its_capability(change: dict[str, object], lost: CorrectiveAction) -> None:
    assert valid(replace(ROOMY, **change)) == set(ACTIONS) - {lost}  # type: ignore[arg-type]


def test_exhausted_time_budget_leaves_only_terminal_actions() -> None:
    assert valid(replace(ROOMY, time_budget_used=1.0)) == {A.skip, A.abort}
    assert valid(replace(ROOMY, time_budget_used=0.99)) == set(ACTIONS)


@settings(max_examples=300, deadline=None)
@given(contexts)
def test_abort_is_always_valid_and_rules_respect_the_mask(ctx: FailureContext) -> None:
    m = mask(ctx)
    assert m[A.abort.ordinal]
    decision = RulesPolicy().decide(ctx)
    assert m[decision.action.ordinal]


# --- features ---


@settings(max_examples=300, deadline=None)
@given(contexts)
def test_features_have_the_schema_shape_and_range(ctx: FailureContext) -> None:
    x = featurize(ctx)
    assert len(x) == FEATURE_DIM
    assert all(-1.0 <= v <= 1.0 for v in x)
    assert sum(x[: len(ERROR_CLASSES)]) == 1.0  # exactly one error class
    assert sum(x[len(ERROR_CLASSES) : len(ERROR_CLASSES) + TYPE_BUCKETS]) == 1.0  # exactly one type bucket


def test_unrecognised_error_classes_are_featurised_as_unknown() -> None:
    unknown = featurize(replace(ROOMY, error_class="unknown"))
    assert featurize(replace(ROOMY, error_class="quota_exceeded")) == unknown
    assert featurize(replace(ROOMY, error_class="cancelled")) == unknown
    assert featurize(replace(ROOMY, error_class="timeout")) != unknown


def test_missing_values_are_flagged_not_confused_with_zero() -> None:
    absent = featurize(replace(ROOMY, upstream_reward=None, duration_ratio=None, time_budget_used=None))
    zero = featurize(replace(ROOMY, upstream_reward=0.0, duration_ratio=0.0, time_budget_used=0.0))
    assert absent != zero


@settings(max_examples=200, deadline=None)
@given(contexts)
def test_context_round_trips_through_json(ctx: FailureContext) -> None:
    data = orjson.loads(orjson.dumps(ctx.to_dict()))
    assert data["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    assert isinstance(data["tried"], dict) and set(data["tried"]) == {str(a) for a in ACTIONS}
    assert FailureContext.from_dict(data) == ctx


def test_from_dict_rejects_other_schemas_and_unknown_fields() -> None:
    data = ROOMY.to_dict()
    with pytest.raises(ValueError, match="schema version"):
        FailureContext.from_dict({**data, "feature_schema_version": FEATURE_SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="unknown failure-context fields"):
        FailureContext.from_dict({**data, "colour": "blue"})
    with pytest.raises(ValueError, match="one per action"):
        FailureContext("timeout", "x", tried=(0, 0))


# --- rules ---


def test_rules_cover_every_known_error_class() -> None:
    assert set(RULES_TABLE) == set(ERROR_CLASSES)


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        (ROOMY, A.retry_now),
        (replace(ROOMY, attempt=2), A.retry_backoff),
        (replace(ROOMY, attempt=3), A.reroute),
        (replace(ROOMY, attempt=9, has_fallback=False), A.retry_backoff),
        (replace(ROOMY, error_class="rate_limited"), A.retry_backoff),
        (replace(ROOMY, error_class="timeout"), A.retry_tuned),
        (replace(ROOMY, error_class="timeout", has_tunable=False), A.retry_now),  # falls through
        (replace(ROOMY, error_class="invalid_input"), A.insert_repair),
        (replace(ROOMY, error_class="permanent"), A.skip),
        (replace(ROOMY, error_class="permanent", optional=False), A.abort),
        (replace(ROOMY, error_class="quota_exceeded"), A.retry_now),  # as unknown
        (replace(ROOMY, surgeries_used=5, optional=False), A.abort),
    ],
)
def test_rules_table(ctx: FailureContext, expected: CorrectiveAction) -> None:
    assert RulesPolicy().decide(ctx).action is expected


def test_rules_decision_is_one_hot_and_logs_as_json() -> None:
    ctx = replace(ROOMY, has_fallback=False)
    d = RulesPolicy().decide(ctx)
    assert len(d.probabilities) == N_ACTIONS and sum(d.probabilities) == 1.0
    assert d.probabilities[d.action.ordinal] == 1.0 == d.chosen_probability
    assert d.mask == mask(ctx) and d.policy_version == "rules-v1" and d.fallback_reason is None
    assert orjson.loads(orjson.dumps(d.to_dict()))["action"] == str(d.action)


def test_a_decision_cannot_choose_a_masked_action() -> None:
    m = mask(replace(ROOMY, optional=False))
    with pytest.raises(ValueError, match="masked"):
        Decision(A.skip, (0.0,) * 5 + (1.0, 0.0), 1.0, m, "v")


# --- learned ---


def favouring(action: CorrectiveAction | None, strength: float = 8.0) -> ActorCritic:
    """A network whose logits ignore the input: a strong preference for ``action`` (or none)."""
    torch.manual_seed(0)
    net = ActorCritic()
    last = net.actor[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        if action is not None:
            last.bias[action.ordinal] = strength
    return net


def learned(net: ActorCritic, **options: object) -> LearnedPolicy:
    known = options.pop("known", ERROR_CLASSES)
    return LearnedPolicy(checkpoint_bytes(net, known), "ppo-test", **options)  # type: ignore[arg-type]


def test_confident_learned_decision() -> None:
    d = learned(favouring(A.reroute)).decide(ROOMY)
    assert d.action is A.reroute and d.fallback_reason is None and d.policy_version == "ppo-test"
    assert d.chosen_probability == d.probabilities[A.reroute.ordinal] > 0.99
    assert abs(sum(d.probabilities) - 1) < 1e-6


def test_masked_actions_get_zero_probability_even_when_favoured() -> None:
    ctx = replace(ROOMY, has_fallback=False)
    d = learned(favouring(A.reroute)).decide(ctx)
    assert d.probabilities[A.reroute.ordinal] == 0.0
    assert d.action is not A.reroute


def test_falls_back_on_an_error_class_it_never_saw() -> None:
    policy = learned(favouring(A.reroute), known=["transient", "timeout"])
    d = policy.decide(replace(ROOMY, error_class="rate_limited"))
    assert d.fallback_reason is not None and d.fallback_reason.startswith("unknown_error_class:")
    assert d.action is A.retry_backoff and d.policy_version == "rules-v1"
    assert policy.decide(ROOMY).fallback_reason is None


def test_falls_back_when_not_confident() -> None:
    d = learned(favouring(None)).decide(ROOMY)  # uniform over 7 valid actions
    assert d.fallback_reason is not None and d.fallback_reason.startswith("low_confidence:")
    assert d.action is A.retry_now  # the rules' choice


def test_threshold_is_configurable() -> None:
    d = learned(favouring(None), confidence_threshold=0.1).decide(ROOMY)
    assert d.fallback_reason is None


def test_a_single_valid_action_never_falls_back() -> None:
    ctx = replace(ROOMY, surgeries_used=5, optional=False)
    d = learned(favouring(None)).decide(ctx)
    assert d.action is A.abort and d.fallback_reason is None


def test_falls_back_on_another_feature_schema_without_loading_the_weights() -> None:
    policy = learned(favouring(A.reroute), feature_schema_version=FEATURE_SCHEMA_VERSION + 1)
    assert policy.net is None
    d = policy.decide(ROOMY)
    assert d.fallback_reason is not None and d.fallback_reason.startswith("feature_schema:")


def test_sampling_is_seeded_and_respects_the_mask() -> None:
    ctx = replace(ROOMY, has_fallback=False, has_repair=False)
    draw = [learned(favouring(None), confidence_threshold=0.0, sample=True, seed=3).decide(ctx) for _ in range(2)]
    assert draw[0] == draw[1]
    policy = learned(favouring(None), confidence_threshold=0.0, sample=True, seed=4)
    chosen = {policy.decide(ctx).action for _ in range(200)}
    assert chosen <= valid(ctx) and len(chosen) > 2


def test_weights_round_trip_through_bytes() -> None:
    torch.manual_seed(1)
    first = learned(ActorCritic(hidden=16), known=["timeout", "transient"], confidence_threshold=0.0)
    data = first.to_bytes()
    assert isinstance(data, bytes)
    second = LearnedPolicy(data, "again", confidence_threshold=0.0)
    assert second.known_error_classes == {"timeout", "transient"}
    assert second.probabilities(ROOMY) == first.probabilities(ROOMY)
    assert first.net is not None
    third = LearnedPolicy(first.net.state_dict(), "raw", confidence_threshold=0.0)  # a bare state dict
    assert third.probabilities(ROOMY) == first.probabilities(ROOMY)
    assert load_checkpoint(data)["feature_schema_version"] == FEATURE_SCHEMA_VERSION


def test_garbage_bytes_are_rejected() -> None:
    with pytest.raises(Exception):  # noqa: B017 - torch raises several kinds for garbage
        LearnedPolicy(b"not a checkpoint", "x")


def test_the_correction_package_does_not_import_torch() -> None:
    code = "import sys, controller.correction; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shadow_agreement_counts_only_the_learned_policys_own_decisions() -> None:
    """A shadow policy that fell back to the rules agrees with the rules by construction: that
    must not count as agreement."""
    from controller.correct import Corrector
    from controller.policies import Choice, PolicyBox
    from dagsmith.spec import CorrectionMode

    rules = RulesPolicy().decide(ROOMY)
    own = replace(rules, policy_version="v7")
    fell_back = replace(rules, fallback_reason="unsure: low confidence")
    corrector = Corrector(PolicyBox())
    corrector._record_shadow(Choice(rules, fell_back, CorrectionMode.shadow))
    assert corrector._shadowed == 0
    corrector._record_shadow(Choice(rules, own, CorrectionMode.shadow))
    assert (corrector._shadowed, corrector._agreed) == (1, 1)


def test_an_explored_decision_is_logged_with_what_the_policy_chose_and_its_propensity() -> None:
    """Exploring every time (a share of 1) makes the draw certain: the action taken is a valid
    recovery action, the behaviour distribution says how likely it was, and shadow agreement
    compares the learned policy with what the rules chose, not with the explored action."""
    import random

    from controller.correct import Corrector
    from controller.correction.explore import explorable
    from controller.policies import PolicyBox
    from dagsmith.spec import CorrectionMode

    box = PolicyBox(exploration=1.0, rng=random.Random(3))
    rules = RulesPolicy().decide(ROOMY)
    choices = [box.choose(CorrectionMode.rules, ROOMY) for _ in range(50)]
    options = explorable(rules.mask)
    assert all(c.explored and c.proposed == rules.action for c in choices)
    assert {c.decision.action for c in choices} == set(options)
    assert all(c.propensity == pytest.approx(1 / len(options)) for c in choices)
    assert all(c.distribution[CorrectiveAction.abort.ordinal] == 0.0 for c in choices)
    assert PolicyBox().choose(CorrectionMode.rules, ROOMY).propensity == 1.0  # no exploration: certain

    box.learned = _Agreeing()
    corrector = Corrector(box)
    for _ in range(20):
        corrector._record_shadow(box.choose(CorrectionMode.shadow, ROOMY))
    assert corrector._agreed == corrector._shadowed == 20


def test_a_poison_failure_is_never_explored() -> None:
    """A random re-run of a task whose message crashed every executor that took it would crash
    as many again: even exploring every time, the controller acts as the policy chose, with
    certainty, though a tuned re-run is valid there."""
    import random

    from controller.policies import PolicyBox
    from dagsmith.spec import CorrectionMode

    poison = replace(ROOMY, error_class="poison")
    assert mask(poison)[CorrectiveAction.retry_tuned.ordinal]
    box = PolicyBox(exploration=1.0, rng=random.Random(3))
    for _ in range(20):
        choice = box.choose(CorrectionMode.rules, poison)
        assert not choice.explored and choice.propensity == 1.0
        assert choice.decision.action == RulesPolicy().decide(poison).action


class _Agreeing:
    """A learned policy that always chooses what the rules choose."""

    version = "v-agree"

    def decide(self, ctx: FailureContext) -> Decision:
        return replace(RulesPolicy().decide(ctx), policy_version=self.version)


def test_the_budgets_that_ruled_actions_out_are_named() -> None:
    from controller.correction import limits_reached

    assert limits_reached(ROOMY) == []
    bad_input = replace(ROOMY, error_class="invalid_input", has_repair=True, inserted_used=0, max_inserted=0)
    assert limits_reached(bad_input) == ["maxInsertedTasks (0) reached"]
    spent = replace(ROOMY, retries_used=3, max_retries=3, surgeries_used=4, max_surgeries=4)
    assert limits_reached(spent) == ["maxSurgeries (4) used up", "maxRetries (3) used up"]
