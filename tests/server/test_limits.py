"""Admission control with a controlled clock: token buckets, Retry-After, quotas and their
reservations, capacity. The same Limiter the server uses, on a real ledger."""

import math

import pytest

from engine.server.db import connect
from engine.server.errors import APIError
from engine.server.keys import KeyStore
from engine.server.ledger import Ledger, Price, PriceTable
from engine.server.limits import Limiter, Principal, TokenBucket


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def env(tmp_path):
    conn = connect(str(tmp_path))
    clock = Clock()
    limiter = Limiter(Ledger(conn), PriceTable({"m": Price(1000.0, 2000.0)}), max_in_flight=4,
                      clock=clock)
    keys = KeyStore(conn)

    def principal(name, **limits):
        return Principal(name, keys.create(name, **limits)[0])

    yield limiter, clock, principal
    conn.close()


def rejected(fn) -> APIError:
    with pytest.raises(APIError) as e:
        fn()
    return e.value


def test_token_bucket_refills_continuously():
    bucket = TokenBucket(60, now=0.0)
    bucket.take(60, 0.0)
    assert bucket.level(0.5) == pytest.approx(0.5)
    assert bucket.seconds_until(1, 0.5) == pytest.approx(0.5)
    assert bucket.level(1000.0) == 60  # capped at a minute's worth
    bucket.take(100, 1000.0)  # debt
    assert bucket.seconds_until(1, 1000.0) == pytest.approx(41.0)


def test_rpm_retry_after_is_exactly_when_a_request_fits(env):
    limiter, clock, principal = env
    p = principal("r", rpm=30)  # one every 2 s
    for _ in range(30):
        limiter.admit(p, "m").settle()
    e = rejected(lambda: limiter.admit(p, "m"))
    assert e.status == 429 and e.type == "requests"
    assert e.headers == {"Retry-After": "2", "retry-after-ms": "2000"}
    clock.now += 1.99
    assert rejected(lambda: limiter.admit(p, "m")).status == 429
    clock.now += 0.01
    limiter.admit(p, "m").settle()


def test_tpm_counts_prompt_at_admission_and_completion_as_produced(env):
    limiter, clock, principal = env
    p = principal("t", tpm=600)  # 10 tokens a second
    a = limiter.admit(p, "m", prompt_tokens=300, max_completion_tokens=200,
                      num_engine_requests=1)
    a.set_completion_tokens(150)
    # 600 - 300 - 150 = 150 left; 50 more may still come from the request in flight
    e = rejected(lambda: limiter.admit(p, "m", prompt_tokens=200, num_engine_requests=1))
    assert e.type == "tokens" and e.headers["Retry-After"] == "10"  # (200 + 50 - 150) / 10
    a.set_completion_tokens(200)
    a.settle()
    clock.now += 10
    b = limiter.admit(p, "m", prompt_tokens=200, num_engine_requests=1)
    b.settle()
    e = rejected(lambda: limiter.admit(p, "m", prompt_tokens=601, num_engine_requests=1))
    assert e.status == 400 and e.code == "tokens_exceed_tpm"


def test_a_rejected_request_spends_nothing(env):
    limiter, clock, principal = env
    p = principal("both", rpm=60, tpm=100)
    rejected(lambda: limiter.admit(p, "m", prompt_tokens=101, num_engine_requests=1))
    for _ in range(60):  # the 400 above took no request from the rpm bucket
        limiter.admit(p, "m", prompt_tokens=1, num_engine_requests=1).settle()
    assert rejected(lambda: limiter.admit(p, "m", prompt_tokens=1)).type == "requests"


def test_quota_reservations_bound_concurrent_overrun(env):
    limiter, clock, principal = env
    p = principal("q", token_quota=100)
    admitted = []
    for _ in range(10):  # all at once: each reserves 5 + 30
        try:
            admitted.append(limiter.admit(p, "m", prompt_tokens=5, max_completion_tokens=30,
                                          num_engine_requests=1))
        except APIError as e:
            assert e.code == "quota_reserved" and e.headers["Retry-After"] == "1"
            break
    assert len(admitted) == 3  # 0 + 70 + 5 <= 100 admits the third; 105 + 5 does not
    for a in admitted:
        a.set_completion_tokens(30)
        a.settle()
    used, _ = limiter.ledger.totals("q")
    assert used == 105 <= 100 + 30
    e = rejected(lambda: limiter.admit(p, "m", prompt_tokens=5, max_completion_tokens=30))
    assert e.code == "insufficient_quota" and "Retry-After" not in e.headers


def test_budget_uses_the_price_table(env):
    limiter, clock, principal = env
    p = principal("b", budget_usd=0.01)  # 0.001 USD per token in, 0.002 out
    a = limiter.admit(p, "m", prompt_tokens=4, max_completion_tokens=2, num_engine_requests=1)
    a.set_completion_tokens(2)
    assert a.settle() == pytest.approx(0.008)
    assert limiter.ledger.totals("b")[1] == pytest.approx(0.008)
    e = rejected(lambda: limiter.admit(p, "m", prompt_tokens=3, max_completion_tokens=1,
                                       num_engine_requests=1))
    assert e.code == "insufficient_quota" and "USD" in e.message


def test_capacity_is_503_and_settle_releases_it(env):
    limiter, clock, principal = env
    anonymous = Principal("anonymous")
    a = limiter.admit(anonymous, "m", prompt_tokens=1, num_engine_requests=3)
    e = rejected(lambda: limiter.admit(anonymous, "m", prompt_tokens=1, num_engine_requests=2))
    assert e.status == 503 and e.headers["Retry-After"] == "1"
    limiter.admit(anonymous, "m").settle()  # tokenize and the like need no engine capacity
    a.settle()
    a.settle()  # idempotent
    assert limiter.num_in_flight == 0
    limiter.admit(anonymous, "m", prompt_tokens=1, num_engine_requests=4).settle()
    assert limiter.ledger.totals("anonymous") == (2, 0.001 * 2)
    assert math.isclose(limiter.ledger.rows("anonymous")[0]["num_requests"], 2)
