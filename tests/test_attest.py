"""Signed spend statements: keys, the change digest, signing, every verification failure."""

from __future__ import annotations

import copy
import json

import pytest

from cage import attest
from cage.errors import UsageError
from cage.gitio import Repo

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
BASE = "a" * 40
TREE = "b" * 64

SPEND = {
    "cost_usd": 0.75,
    "calls": 3,
    "unpriced": 0,
    "prior_cost_usd": 0.0,
    "by_model": {
        "gpt-4o": {
            "provider": "openai",
            "calls": 2,
            "input_tokens": 1000,
            "output_tokens": 200,
            "cache_read_tokens": 50,
            "cache_write_tokens": 0,
            "cost_usd": 0.5,
            "unpriced": 0,
        },
        "claude-sonnet-4": {
            "provider": "anthropic",
            "calls": 1,
            "input_tokens": 10,
            "output_tokens": 20,
            "cache_read_tokens": 0,
            "cache_write_tokens": 30,
            "cost_usd": 0.25,
            "unpriced": 0,
        },
    },
    "truth": {"measured": {"calls": 3, "cost_usd": 0.75}},
}


def payload(**over):
    p = attest.statement_payload(
        mission_id="m-1",
        base=BASE,
        tree=TREE,
        spend=SPEND,
        cap_usd=5,
        issued_at="2026-11-23T10:00:00Z",
    )
    p.update(over)
    return p


def signed(**over):
    return attest.sign(payload(**over), KEY)


# -- keys ---------------------------------------------------------------------------------


def test_key_from_env_strips_whitespace():
    assert attest.load_key(env={"CAGE_ATTEST_KEY": "  " + "x" * 20 + "\n"}) == b"x" * 20


def test_empty_env_key_means_no_key():
    assert attest.load_key(env={"CAGE_ATTEST_KEY": ""}) is None
    assert attest.load_key(env={}) is None


def test_short_key_is_refused_without_showing_it():
    with pytest.raises(UsageError) as info:
        attest.load_key(env={"CAGE_ATTEST_KEY": "hunter2secret"})
    assert "13 bytes" in str(info.value) and "at least 16" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_key_file(tmp_path):
    path = tmp_path / "attest.key"
    path.write_text("y" * 40 + "\n")
    # the file wins over the environment
    assert attest.load_key(path, env={"CAGE_ATTEST_KEY": "z" * 40}) == b"y" * 40


def test_key_file_problems(tmp_path):
    with pytest.raises(UsageError, match="cannot read the attest key file"):
        attest.load_key(tmp_path / "missing.key")
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        attest.load_key(empty)
    short = tmp_path / "short.key"
    short.write_text("abc")
    with pytest.raises(UsageError, match="3 bytes"):
        attest.load_key(short)


def test_key_id_is_a_short_hash():
    assert attest.key_id(KEY) == attest.key_id(KEY) != attest.key_id(OTHER_KEY)
    assert len(attest.key_id(KEY)) == 8 and KEY.decode() not in attest.key_id(KEY)


# -- payload and signing ------------------------------------------------------------------


def test_payload_totals_and_order():
    p = payload()
    assert p["schema"] == attest.SCHEMA
    assert p["totals"] == {
        "cost_usd": 0.75,
        "calls": 3,
        "input_tokens": 1010,
        "output_tokens": 220,
        "cache_read_tokens": 50,
        "cache_write_tokens": 30,
        "unpriced": 0,
    }
    assert [m["model"] for m in p["by_model"]] == ["claude-sonnet-4", "gpt-4o"]
    assert p["truth"]["measured"] == {"calls": 3, "cost_usd": 0.75}
    assert p["truth"]["estimated"] == {"calls": 0, "cost_usd": 0.0}
    assert attest.payload_problem(p) is None


def test_signature_survives_reformatting():
    statement = signed()
    # A receipt re-indents and re-orders the JSON: the canonical form is what is signed.
    pretty = json.loads(json.dumps(statement, indent=4, sort_keys=False))
    assert attest.verify(pretty, KEY, base=BASE, digest=TREE) == (True, "ok")
    assert statement["alg"] == "HMAC-SHA256" and statement["key_id"] == attest.key_id(KEY)


def test_canonical_form():
    assert attest.canonical({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'
    with pytest.raises(ValueError):
        attest.canonical({"x": float("nan")})


def test_sign_refuses_a_short_key():
    with pytest.raises(UsageError):
        attest.sign(payload(), b"short")


# -- verification: each failure has its own code -------------------------------------------


def edited(path, value):
    statement = signed()
    target = statement
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return statement


@pytest.mark.parametrize(
    ("statement", "key", "expected"),
    [
        (None, KEY, "unsigned"),
        ("a string", KEY, "malformed"),
        ({"payload": "x", "signature": "0" * 64}, KEY, "malformed"),
        (edited(("signature",), None), KEY, "unsigned"),
        (edited(("signature",), "xyz"), KEY, "malformed"),
        (edited(("payload", "schema"), "cage.spend-statement/v9"), KEY, "unsupported_schema"),
        (edited(("alg",), "HMAC-MD5"), KEY, "unsupported_schema"),
        (signed(), None, "no_key_configured"),
        (signed(), OTHER_KEY, "wrong_key"),
        (edited(("key_id",), "nothex"), KEY, "malformed"),
        (edited(("payload", "totals", "cost_usd"), 0.01), KEY, "bad_signature"),
        (edited(("payload", "by_model"), []), KEY, "bad_signature"),
        (edited(("payload", "extra"), 1), KEY, "bad_signature"),
        (signed(base="c" * 40), KEY, "wrong_base"),
        (signed(tree="d" * 64), KEY, "wrong_change"),
        (signed(), KEY, "ok"),
    ],
)
def test_verify_codes(statement, key, expected):
    ok, code = attest.verify(statement, key, base=BASE, digest=TREE)
    assert code == expected
    assert ok is (expected == "ok")
    assert code == "ok" or code in attest.CHECKS


def test_key_id_edited_to_match_still_fails_on_the_signature():
    forged = attest.sign(payload(), OTHER_KEY)
    forged["key_id"] = attest.key_id(KEY)
    assert attest.verify(forged, KEY, base=BASE, digest=TREE) == (False, "bad_signature")


def test_signed_but_malformed_payload():
    statement = attest.sign(payload(totals={"cost_usd": -1}), KEY)
    assert attest.verify(statement, KEY, base=BASE, digest=TREE) == (False, "malformed")


def test_digest_is_only_computed_when_needed():
    calls = []

    def digest():
        calls.append(1)
        return TREE

    attest.verify(signed(base="c" * 40), KEY, base=BASE, digest=digest)
    assert calls == []
    assert attest.verify(signed(), KEY, base=BASE, digest=digest) == (True, "ok")
    assert calls == [1]


# -- evidence parsing -----------------------------------------------------------------------


def test_receipt_evidence():
    receipt = json.dumps({"id": "m-1", "spend_statement": signed()}).encode()
    item = attest.evidence_from_receipt(".runcap/outcomes/m-1/receipt.json", receipt)
    assert item.problem is None and item.in_repo and item.statement["payload"]["base"] == BASE
    unsigned = attest.evidence_from_receipt("r.json", b'{"spend_statement": null}')
    assert unsigned.statement is None and unsigned.problem is None
    assert "not valid JSON" in attest.evidence_from_receipt("r.json", b"{oops").problem
    assert attest.evidence_from_receipt("r.json", b'{"x": NaN}').problem is not None
    assert attest.evidence_from_receipt("r.json", b"[1]").problem is not None
    big = b" " * (attest.MAX_EVIDENCE_BYTES + 1)
    assert "larger than" in attest.evidence_from_receipt("r.json", big).problem


def test_file_evidence_shapes():
    one = attest.evidence_from_file("s.json", json.dumps(signed()).encode())
    assert len(one) == 1 and one[0].source == "s.json" and not one[0].in_repo
    receipt = attest.evidence_from_file(
        "r.json", json.dumps({"spend_statement": signed()}).encode()
    )
    assert receipt[0].statement["alg"] == attest.ALG
    many = attest.evidence_from_file("l.json", json.dumps([signed(), signed()]).encode())
    assert [e.source for e in many] == ["l.json[0]", "l.json[1]"]
    missing = attest.evidence_from_file("gone.json", None, "No such file")
    assert missing[0].problem == "No such file"


# -- assessment ------------------------------------------------------------------------------


def run_assess(items, key=KEY, mode="optional", limit=5.0):
    return attest.assess(items, key, mode=mode, base=BASE, digest=lambda: TREE, limit_usd=limit)


def ev(statement, source=".runcap/outcomes/m/receipt.json"):
    return attest.Evidence(source, statement, in_repo=True)


def test_assess_valid_under_limit():
    a = run_assess([ev(signed())])
    assert a.reasons == []
    assert a.spend["status"] == "attested"
    assert a.spend["total_usd"] == 0.75 and a.spend["calls"] == 3
    assert [m["model"] for m in a.spend["by_model"]] == ["claude-sonnet-4", "gpt-4o"]
    assert a.spend["statements"][0]["valid"] is True


def test_assess_over_limit():
    a = run_assess([ev(signed())], limit=0.5)
    assert [r[0] for r in a.reasons] == ["spend_over_limit"]
    assert "$0.7500" in a.reasons[0][1]


def test_assess_prior_spend_counts_against_the_limit():
    p = payload(prior_cost_usd=4.5)
    a = run_assess([ev(attest.sign(p, KEY))])
    assert a.spend["total_usd"] == 5.25
    assert [r[0] for r in a.reasons] == ["spend_over_limit"]


def test_assess_invalid_is_informational_and_named():
    a = run_assess([ev(signed(tree="d" * 64), ".runcap/outcomes/x/receipt.json")])
    assert [r[0] for r in a.reasons] == ["spend_evidence_invalid"]
    _code, message, path = a.reasons[0]
    assert path == ".runcap/outcomes/x/receipt.json" and "wrong_change" in message
    assert a.spend["status"] == "unattested" and a.spend["total_usd"] is None


def test_assess_required_without_a_valid_statement():
    a = run_assess([ev(attest.sign(payload(), OTHER_KEY))], mode="required")
    assert [r[0] for r in a.reasons] == ["spend_evidence_invalid", "spend_unattested"]
    a = run_assess([], mode="required", key=None)
    assert [r[0] for r in a.reasons] == ["spend_unattested"]
    assert "no attest key" in a.reasons[0][1]


def test_assess_off_reads_nothing():
    a = run_assess([ev(None)], mode="off")
    assert a.reasons == [] and a.spend["status"] == "off" and a.spend["statements"] == []


def test_assess_sums_missions_and_counts_a_copy_once():
    first, second = signed(), signed(mission_id="m-2")
    a = run_assess([ev(first), ev(copy.deepcopy(first), "copy.json"), ev(second)])
    assert a.spend["total_usd"] == 1.5 and a.spend["calls"] == 6
    assert [s["check"] for s in a.spend["statements"]] == ["ok", "duplicate", "ok"]
    assert a.reasons == []


def test_assess_unpriced_calls_make_a_lower_bound():
    spend = copy.deepcopy(SPEND)
    spend["by_model"]["gpt-4o"]["unpriced"] = 1
    p = attest.statement_payload(mission_id="m", base=BASE, tree=TREE, spend=spend, cap_usd=5)
    a = run_assess([ev(attest.sign(p, KEY))])
    assert a.spend["unpriced"] == 1 and "lower bound" in a.spend["note"]


def test_assess_never_leaks_the_key():
    a = run_assess([ev(signed())])
    assert KEY.decode() not in json.dumps(a.spend)


# -- the change digest (real git) ------------------------------------------------------------


def test_change_digest_ignores_receipts_only(git_repo):
    git_repo.write("src/a.py", "x = 1\n")
    git_repo.write(".runcap/mission.yaml", "version: v1\n")
    first = git_repo.commit("one")
    repo = Repo(git_repo.path)
    digest = attest.change_digest(repo, first)
    assert len(digest) == 64

    git_repo.write(".runcap/outcomes/m-1/receipt.json", "{}\n")
    with_receipt = git_repo.commit("receipt")
    assert attest.change_digest(repo, with_receipt) == digest

    git_repo.write("src/a.py", "x = 2\n")
    assert attest.change_digest(repo, git_repo.commit("edit")) != digest
    git_repo.write("src/a.py", "x = 1\n")
    assert attest.change_digest(repo, git_repo.commit("back")) == digest

    git_repo.write("src/a.py", "x = 1\n", mode=0o755)
    assert attest.change_digest(repo, git_repo.commit("mode")) != digest


def test_list_tree_lists_every_blob(git_repo):
    git_repo.write("a.txt", "a")
    git_repo.write("d/e/f.txt", "f")
    commit = git_repo.commit()
    entries = Repo(git_repo.path).list_tree(commit)
    assert sorted(e.path for e in entries) == ["a.txt", "d/e/f.txt"]
    assert {e.type for e in entries} == {"blob"}


# -- the proxy signs (real proxy, mock upstream) ----------------------------------------------


def _chat(url: str) -> int:
    import urllib.request

    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body.encode(),
        headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


def test_proxy_signs_what_it_metered(tmp_path):
    proxy = pytest.importorskip("cage.proxy")
    with proxy.start_proxy_in_thread(
        mission_id="m-proxy",
        budget_usd=2.0,
        mock=True,
        ledger_path=str(tmp_path / "l.db"),
        attest_key=KEY,
    ) as running:
        assert _chat(running.url) == 200 and _chat(running.url) == 200
        running.flush()
    statement = running.spend_statement(BASE, TREE)
    assert attest.verify(statement, KEY, base=BASE, digest=TREE) == (True, "ok")
    p = statement["payload"]
    assert p["mission_id"] == "m-proxy" and p["cap_usd"] == 2.0
    assert p["totals"]["calls"] == 2 and p["truth"]["measured"]["calls"] == 2
    assert p["totals"]["cost_usd"] == running.spend()["cost_usd"]
    assert [m["model"] for m in p["by_model"]] == ["gpt-4o-mini"]
    # The key never appears in the proxy's configuration as printed.
    assert repr(KEY) not in repr(running._proxy.config)


def test_proxy_without_a_key_signs_nothing(tmp_path):
    proxy = pytest.importorskip("cage.proxy")
    with proxy.start_proxy_in_thread(
        mission_id="m", budget_usd=1.0, mock=True, ledger_path=str(tmp_path / "l.db")
    ) as running:
        pass
    assert running.spend_statement(BASE, TREE) is None


def test_proxy_refuses_a_short_key(tmp_path):
    proxy = pytest.importorskip("cage.proxy")
    with pytest.raises(UsageError, match="at least 16"):
        proxy.start_proxy_in_thread(mission_id="m", budget_usd=1.0, mock=True, attest_key=b"short")


def test_an_attest_key_fifo_without_a_writer_is_refused_not_waited_for(tmp_path):
    # open() on a FIFO nobody writes to blocked `cage ci` forever.
    import os

    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is empty"):
        attest.load_key(fifo, env={})
    with pytest.raises(UsageError, match="Is a directory"):
        attest.load_key(tmp_path, env={})


def test_a_spend_evidence_fifo_without_a_writer_is_unreadable_not_waited_for(tmp_path):
    import os

    fifo = tmp_path / "evidence.json"
    os.mkfifo(fifo)
    [evidence] = attest.gather(None, [], evidence_path=str(fifo))
    assert evidence.statement is None and "not valid JSON" in evidence.problem
