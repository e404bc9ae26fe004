"""The worker's memory budget: the worker's limit, a key's share, a lone large request, and a
large whole answer that is not copied on its way out."""

from __future__ import annotations

import pytest

from gateway.dispatch.delivery import HEAD_FIRST_BYTES, HeadFirstResponse, whole_answer
from gateway.dispatch.memory_budget import MemoryBudget
from gateway.shared.errors import GatewayError


async def test_a_key_past_its_share_gets_429_and_the_worker_past_its_limit_503() -> None:
    """With 100 bytes and a half share: a key holding 40 is refused 20 more (429), another key
    still gets 50, and past the worker's 100 a third key gets 503; released bytes come back."""
    budget = MemoryBudget(100, 0.5, wait_seconds=0)
    first, second, third = (budget.reservation(key) for key in ("a", "b", "c"))
    first.take_now("request_body", 40)
    with pytest.raises(GatewayError) as share:
        budget.reservation("a").take_now("request_body", 20)
    assert (share.value.status, share.value.code) == (429, "key_memory_share")
    second.take_now("request_body", 50)
    with pytest.raises(GatewayError) as worker:
        third.take_now("request_body", 20)
    assert (worker.value.status, worker.value.code) == (503, "memory_busy")
    assert not third.try_take("upload_copy", 20)
    first.release()
    second.release()
    assert budget.held == 0
    third.take_now("request_body", 20)
    assert budget.held_for("request_body") == 20
    assert budget.refusals[("request_body", "key_share")] == 1


async def test_a_lone_request_larger_than_the_budget_is_allowed() -> None:
    """Nothing else held: one request may hold more than the budget (max_body_bytes allows it)."""
    budget = MemoryBudget(100, 0.5, wait_seconds=0)
    lone = budget.reservation("a")
    lone.take_now("request_body", 150)
    await lone.take(10)
    assert budget.held == 160
    with pytest.raises(GatewayError) as refused:
        await budget.reservation("b").take(1)
    assert (refused.value.status, refused.value.code) == (503, "answer_memory_busy")


def test_a_large_whole_answer_goes_out_head_first_and_uncopied() -> None:
    """Past HEAD_FIRST_BYTES an answer's head is written on its own, so its body is handed to
    the transport as it is (not joined into a second copy); small answers keep one write."""
    large = bytearray(HEAD_FIRST_BYTES + 1)
    response = whole_answer(200, large, {})
    assert isinstance(response, HeadFirstResponse)
    assert response.body is large
    assert not isinstance(whole_answer(200, b"{}", {}), HeadFirstResponse)
