"""`nfq-sttcp status` judges a daemon healthy, degraded or down (pure)."""

from nfq_sttcp.control import DEGRADED, DOWN, EXIT_CODES, HEALTHY, health

CONN = {"conn": "10.77.0.10:40000 -> 10.77.0.100:7000", "protected": True, "reason": ""}


def test_health_of_each_role_and_state():
    assert health({"role": "primary", "state": "serving", "backup": "present", "connections": [CONN]}) == (HEALTHY, [])
    assert health({"role": "backup", "state": "following", "connections": [CONN]}) == (HEALTHY, [])
    level, why = health({"role": "primary", "state": "serving", "backup": "absent", "connections": []})
    assert level == DEGRADED and "no backup follows" in why[0]
    level, why = health({"role": "primary", "state": "serving", "backup": "present",
                         "connections": [CONN, dict(CONN, protected=False, reason="opened before the backup joined")]})
    assert level == DEGRADED and why == ["1 connection(s) unprotected: opened before the backup joined"]
    level, why = health({"role": "backup", "state": "orphaned", "connections": []})
    assert level == DEGRADED and "suspended" in why[0]
    # a backup that took over serves as the primary: it needs a backup of its own
    level, why = health({"role": "backup", "state": "active", "serving_as": "primary", "backup": "absent",
                         "connections": []})
    assert level == DEGRADED and "no backup follows" in why[0]
    assert health({"role": "backup", "state": "fault", "connections": []})[0] == DOWN
    assert EXIT_CODES == {HEALTHY: 0, DEGRADED: 1, DOWN: 2}


def test_a_long_connection_list_is_cut_but_counted():
    # the status lists at most 1,000 connections; the summary counts them all
    st = {"role": "primary", "state": "serving", "backup": "present", "connections": [CONN],
          "summary": {"connections": 5000, "protected": 4000, "unprotected": 1000}}
    level, why = health(st)
    assert level == DEGRADED and why[0].startswith("1000 connection(s) unprotected")


def test_a_link_raised_to_big_tcp_is_degraded_even_with_every_connection_protected():
    st = {"role": "primary", "state": "serving", "backup": "present", "connections": [CONN],
          "oversize_links": ["lan0"]}
    level, why = health(st)
    assert level == DEGRADED and why[0].startswith("BIG TCP packets over 64 KB on lan0: their connections go "
                                                   "unprotected")
