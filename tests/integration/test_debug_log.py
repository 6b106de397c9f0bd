"""A whole instance with error_log ... debug: the debug logging paths must
not crash or raise [alert]s."""

import time

from sgtest import api, smtp_dialog


def test_debug_logging_instance(sg_instance):
    inst = sg_instance(workers=2, error_log_level="debug")
    try:
        r = api(inst, "GET", "/api/v1/health", token=None)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = api(inst, "GET", "/api/v1/settings")
        assert r.status_code == 200
        p = api(inst, "PATCH", "/api/v1/settings",
                json={"tls_reporting": {"organization_name": "Debug"}})
        assert p.status_code == 200
        assert p.json()["tls_reporting"]["organization_name"] == "Debug"
        bad = api(inst, "PATCH", "/api/v1/settings", json={"x": 1})
        assert bad.status_code == 422
        assert api(inst, "PATCH", "/api/v1/settings", data=b"{").status_code == 400
        assert api(inst, "GET", "/api/v1/settings", token="x").status_code == 401
        r = smtp_dialog(inst.smtp_port, ["EHLO x", ["NOOP", "RSET"], "FOO",
                                         "QUIT"])
        assert [c for c, _ in r] == [220, 250, 250, 250, 500, 221]
        # the change reaches the workers, still alive
        version = int(p.headers["ETag"].strip('"'))
        # 20 s: under the 30 s settings poll, so only NOTIFY passes
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h = api(inst, "GET", "/api/v1/health", token=None,
                    headers={"Connection": "close"}).json()
            if h["worker"]["settings_version"] >= version:
                break
            time.sleep(0.1)
        assert h["worker"]["settings_version"] >= version
        with open(inst.error_log, errors="replace") as f:
            log = f.read()
        assert "[debug]" in log
        assert "exited on signal" not in log
    finally:
        inst.reset_settings()
