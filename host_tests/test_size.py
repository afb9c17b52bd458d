"""`make size` (tools/size): does each configuration fit each ESP32 board? The model on its own
(GC heap growth, ESP-IDF heap left for TLS), then the command on given heap figures."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host import size as S  # noqa: E402
from iotjobs_host.fileserver import FlakyServer  # noqa: E402

ESP32 = {"gc_heap_boot_kb": 56, "gc_heap_grown_kb": 112, "idf_reserve_kb": 40,
         "tls_session_held_kb": 21, "tls_handshake_peak_kb": 45}


def test_a_job_within_the_boot_heap_leaves_the_growth_to_esp_idf():
    r = S.fit(ESP32, 42, 2)
    assert (r["heap_kb"], r["growths"]) == (56, 0)
    assert r["idf_free_kb"] == 40 + 112 - 56  # the heap never took its second area
    assert r["idf_need_kb"] == 21 + 45  # one session held, the other at its handshake
    assert (r["verdict"], r["margin_kb"]) == ("FITS", min(56 - 42, 96 - 66))


def test_a_job_that_grows_the_heap_leaves_esp_idf_its_reserve():
    one = S.fit(ESP32, 64, 1)
    assert (one["heap_kb"], one["growths"], one["idf_free_kb"]) == (112, 1, 40)
    assert (one["verdict"], one["margin_kb"]) == ("DOES NOT FIT", 40 - 45)
    assert "45 KB of ESP-IDF heap, 40 KB left" in one["why"]
    roomy = dict(ESP32, idf_reserve_kb=80)
    assert S.fit(roomy, 100, 1) == dict(S.fit(roomy, 100, 1), verdict="FITS", margin_kb=12)


def test_a_job_beyond_one_growth_does_not_fit_whatever_the_idf_heap():
    r = S.fit(dict(ESP32, idf_reserve_kb=1000), 113, 1)
    assert (r["verdict"], r["margin_kb"], r["growths"]) == ("DOES NOT FIT", -1, 2)
    assert "more than one growth gives (112 KB)" in r["why"]


def test_an_unknown_idf_reserve_is_said_not_guessed():
    mem = dict(ESP32, idf_reserve_kb=None, gc_heap_boot_kb=64, gc_heap_grown_kb=128)
    r = S.fit(mem, 30, 2)
    assert (r["verdict"], r["margin_kb"], r["idf_free_kb"]) == ("UNKNOWN", 34, None)
    assert S.fit(mem, 129, 1)["verdict"] == "DOES NOT FIT"  # the GC heap alone decides that


def heaps(fleet_ota=42):
    def both(tls):
        return {"tls": tls, "plain": tls - 2}

    return {"stock32": {"noop": both(64), "command": both(64), "download": both(80),
                        "ota": both(92), "ota_mqtt": both(70), "app_update": both(100)},
            "fleet32": {"noop": both(22), "command": both(24), "download": both(30),
                        "ota": both(fleet_ota), "ota_mqtt": both(30), "app_update": both(41)}}


def test_evaluate_covers_every_board_configuration_and_job():
    boards = S.load_boards(None)
    assert set(boards) == {"ESP32_GENERIC", "ESP32_GENERIC_S3", "ESP32_GENERIC_C3"}
    rows = S.evaluate(boards, heaps())
    assert len(rows) == 3 * len(S.CONFIGS) * len(S.JOBS)
    assert not S.failures(rows)
    ota = [r for r in rows if r["board"] == "ESP32_GENERIC" and r["job"] == "ota"]
    assert {r["config"]: r["verdict"] for r in ota} == {"stock": "DOES NOT FIT", "frozen": "FITS"}
    bad = S.failures(S.evaluate(boards, heaps(fleet_ota=130)))
    assert {(r["board"], r["config"], r["job"]) for r in bad} == {
        (b, "frozen", "ota") for b in boards}


def run_size(tmp_path, figures, *extra):
    path = tmp_path / "heaps.json"
    path.write_text(json.dumps(figures))
    out = tmp_path / "rows.json"
    r = subprocess.run([os.path.join(ROOT, "tools", "size"), "--heaps", str(path),
                        "--board", "ESP32_GENERIC", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=300)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_make_size_prints_the_fit_table_and_fails_when_a_recommended_configuration_does_not_fit(
        tmp_path):
    r, data = run_size(tmp_path, heaps())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| frozen (recommended) | 1 MiB signed OTA over HTTPS | 42 KB (40) | 56 KB | 2 | " \
           "96 / 66 KB | FITS (+14 KB) |" in r.stdout, r.stdout
    assert "| stock | 1 MiB signed OTA over HTTPS | 92 KB (90) | 112 KB (grown once) | 2 | " \
           "40 / 66 KB | DOES NOT FIT (-26 KB)" in r.stdout, r.stdout
    code = data["code"]["ESP32_GENERIC"]
    assert 0 < code["ours_bytes"] < code["frozen_bytes"] < code["slot_bytes"]
    assert f"in an OTA app slot of {code['slot_bytes']} bytes" in r.stdout

    r, _ = run_size(tmp_path, heaps(fleet_ota=60))  # grows the heap: two TLS sessions no longer fit
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ESP32_GENERIC frozen (recommended): 1 MiB signed OTA over HTTPS DOES NOT FIT (-26 KB)" \
        in r.stderr, r.stderr


def test_make_size_refuses_incomplete_figures(tmp_path):
    figures = heaps()
    del figures["fleet32"]["download"]
    r, _ = run_size(tmp_path, figures)
    assert r.returncode == 2 and "no fleet32 download tls figure" in r.stderr, r.stderr


def test_the_bench_file_server_serves_a_folder_and_nothing_outside_it(tmp_path):
    import urllib.error
    import urllib.request

    (tmp_path / "root" / "app").mkdir(parents=True)
    (tmp_path / "root" / "app" / "m.py").write_bytes(b"x = 1\n")
    (tmp_path / "secret").write_bytes(b"no")
    srv = FlakyServer(None, root=str(tmp_path / "root"))
    try:
        with urllib.request.urlopen(srv.url + "app/m.py", timeout=10) as resp:
            assert resp.read() == b"x = 1\n"
        for path in ("app/missing.py", "../secret", "%2e%2e/secret", "app"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.url + path, timeout=10)
            assert e.value.code == 404, path
    finally:
        srv.stop()
