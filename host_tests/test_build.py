"""`make build`: every device file compiles with mpy-cross for the host and for ESP32."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host import build as B  # noqa: E402


def test_build_compiles_every_device_file_for_both_targets():
    r = subprocess.run([os.path.join(ROOT, "tools", "build")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    sources = B.sources()
    assert any(rel == os.path.join("iotjobs", "runner.py") for _, rel in sources)
    assert any(rel == os.path.join("umqtt", "simple.py") for _, rel in sources)
    for arch in ("host", "xtensawin"):
        out = os.path.join(ROOT, "build", "mpy", arch)
        for _, rel in sources:
            name = rel if os.path.basename(rel) in B.KEEP_SOURCE else rel[:-3] + ".mpy"
            path = os.path.join(out, name)
            assert os.path.exists(path), f"{arch}: {name} was not built"
            if name.endswith(".mpy"):
                with open(path, "rb") as f:
                    head = f.read(2)
                assert head == b"M\x06", f"{arch}: {name} is not an .mpy v6 file"
        assert f"{arch}: " in r.stdout


def test_build_reports_a_syntax_error(tmp_path, monkeypatch):
    """A file mpy-cross cannot compile fails the build with its name."""
    bad = tmp_path / "lib"
    bad.mkdir()
    (bad / "broken.py").write_text("def f(:\n")
    monkeypatch.setattr(B, "ROOT", str(tmp_path))
    monkeypatch.setattr(B, "BUILD", str(tmp_path / "build"))
    (tmp_path / "build" / "umqtt").mkdir(parents=True)
    (tmp_path / "build" / "umqtt" / "simple.py").write_text("")
    assert B.main(["--arch", "host"]) == 1


def test_every_board_builds_within_its_budget():
    """Each board's files compile for its architecture, without the unix twins, with its own
    board module and board.json, and within its code budget."""
    r = subprocess.run([os.path.join(ROOT, "tools", "build"), "--all-boards"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in B.board_names():
        info = B.board_info(name)
        assert f"{name} ({info['arch']}):" in r.stdout and "within" in r.stdout
        out = os.path.join(ROOT, "build", name)
        files = {rel for rel, _ in B.size_report(out)}
        assert {"main.py", "app.mpy", "iotjobs_board.mpy", "board.json", "iotjobs/runner.mpy",
                "umqtt/simple.mpy"} <= files, files
        total = sum(n for _, n in B.size_report(out))
        assert total <= info["code_budget_kb"] * 1024
        if info["chip"] != "unix":
            assert not files & {"esp32sim.mpy", "testhandlers.mpy"}, "unix twins on a board"
            with open(os.path.join(out, "iotjobs_board.mpy"), "rb") as f:
                mpy = f.read()
            assert b"WLAN" in mpy or b"network" in mpy, "the ESP32 board module, not the twin"
        with open(os.path.join(out, "iotjobs", "runner.mpy"), "rb") as f:
            assert f.read(2) == b"M\x06", "not an .mpy v6 file"
        # (bytecode-only .mpy files record no architecture: -march matters for @native code)


def test_a_board_over_its_budget_fails_the_build(tmp_path, monkeypatch):
    board = tmp_path / "boards" / "TINY"
    board.mkdir(parents=True)
    (board / "board.json").write_text(json.dumps({"board": "TINY", "chip": "unix", "arch": "host",
                                                  "code_budget_kb": 1}))
    monkeypatch.setattr(B, "BOARDS", str(tmp_path / "boards"))
    monkeypatch.setattr(B, "BUILD", str(tmp_path / "build"))
    assert B._boards(["TINY"], False) == 1
    assert B._boards(["NOPE"], False) == 2


def test_partition_tables_are_sound():
    """Both OTA tables: contiguous, 4 KB aligned (apps 64 KB), two equal app slots, otadata,
    the filesystem up to the end of the flash."""
    for name, flash in (("ota-4MiB.csv", 4 << 20), ("ota-8MiB.csv", 8 << 20)):
        rows = []
        with open(os.path.join(ROOT, "boards", "partitions", name)) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    cols = [c.strip() for c in line.split(",")]
                    rows.append((cols[0], cols[1], cols[2], int(cols[3], 16), int(cols[4], 16)))
        end = rows[0][3]
        for label, kind, _, off, size in rows:
            assert off == end, f"{name}: {label} does not follow the previous partition"
            assert off % (0x10000 if kind == "app" else 0x1000) == 0, f"{name}: {label} misaligned"
            end = off + size
        assert end == flash, f"{name}: ends at {end:#x}"
        apps = [r for r in rows if r[1] == "app"]
        assert [a[0] for a in apps] == ["ota_0", "ota_1"] and apps[0][4] == apps[1][4]
        assert any(r[0] == "otadata" and r[4] == 0x2000 for r in rows)
        assert rows[-1][0] == "vfs"
    for board in B.board_names():
        part = B.board_info(board).get("partitions")
        assert part is None or os.path.exists(os.path.join(ROOT, "boards", "partitions", part))


def test_mip_package_lists_the_library():
    with open(os.path.join(ROOT, "lib", "package.json")) as f:
        pkg = json.load(f)
    files = sorted(f"iotjobs/{n}" for n in os.listdir(os.path.join(ROOT, "lib", "iotjobs"))
                   if n.endswith(".py"))
    assert sorted(dest for dest, _ in pkg["urls"]) == files, "lib/package.json is out of date"
    for dest, src in pkg["urls"]:
        assert dest == src and os.path.exists(os.path.join(ROOT, "lib", src))
    assert ["umqtt.simple", "latest"] in pkg["deps"] and pkg["version"]


def _manifest(tmp_path, body: str) -> str:
    """A copy of a board manifest in tmp_path, its relative paths made absolute."""
    path = tmp_path / "manifest.py"
    path.write_text(body.replace('"../../', '"' + os.path.join(ROOT, "")).replace(
        '"../esp32"', repr(os.path.join(ROOT, "boards", "esp32"))))
    return str(path)


def test_board_manifests_go_through_makemanifest_and_freeze_our_code():
    from iotjobs_host import images

    for name in ("ESP32_GENERIC", "ESP32_GENERIC_S3", "ESP32_GENERIC_C3"):
        info = B.board_info(name)
        fz = images.freeze_board(name, info["arch"])
        assert fz["ours_modules"] >= 18 and fz["ours_bytes"] > 40_000, fz
        assert fz["bytes"] < B.ota_slot_bytes(info), "frozen code larger than the OTA slot"
        frozen = os.path.join(ROOT, "build", "frozen", name, "frozen_mpy")
        assert os.path.exists(os.path.join(frozen, "iotjobs", "runner.mpy"))
        assert os.path.exists(os.path.join(frozen, "umqtt", "simple.mpy"))  # the stock's


def test_a_manifest_naming_a_missing_file_fails(tmp_path):
    from iotjobs_host import images

    with open(os.path.join(ROOT, "boards", "ESP32_GENERIC", "manifest.py")) as f:
        good = f.read()
    bad = _manifest(tmp_path, good.replace('module("app.py"', 'module("no-such-module.py"'))
    with pytest.raises(images.ImageError, match="no-such-module"):
        images.freeze_board("ESP32_GENERIC", "xtensawin", bad, str(tmp_path / "out"))


def test_a_manifest_freezing_again_what_the_stock_image_freezes_fails(tmp_path):
    from iotjobs_host import images

    with open(os.path.join(ROOT, "boards", "ESP32_GENERIC", "manifest.py")) as f:
        good = f.read()
    again = _manifest(tmp_path, good + '\nrequire("umqtt.simple")\n')
    with pytest.raises(images.ImageError, match="umqtt/simple.py"):
        images.freeze_board("ESP32_GENERIC", "xtensawin", again, str(tmp_path / "out"))
    # the same manifest without the repeat passes: the check is about the repeat
    ok = _manifest(tmp_path, good)
    assert images.freeze_board("ESP32_GENERIC", "xtensawin", ok, str(tmp_path / "out2"))["ours_modules"]


def test_esp32_boards_carry_their_memory_facts_with_a_source():
    for name in ("ESP32_GENERIC", "ESP32_GENERIC_S3", "ESP32_GENERIC_C3"):
        mem = B.board_info(name)["memory"]
        assert 32 <= mem["gc_heap_boot_kb"] < mem["gc_heap_grown_kb"] <= 256, (name, mem)
        assert mem["tls_session_held_kb"] < mem["tls_handshake_peak_kb"], (name, mem)
        assert mem["idf_reserve_kb"] is None or 0 < mem["idf_reserve_kb"] < 200, (name, mem)
        assert "ESP32-MEMORY.md" in mem["source"], name


def test_the_memory_facts_stay_on_the_host():
    out = B.build_board("ESP32_GENERIC")
    with open(os.path.join(out, "board.json")) as f:
        deployed = json.load(f)
    assert "memory" not in deployed and deployed["wdt_ms"] == B.board_info("ESP32_GENERIC")["wdt_ms"]


def test_both_board_modules_give_what_the_device_code_uses():
    """What firmware/app.py (`hw.NAME`) and the OTA handler (`self.board.NAME`) take from the
    board module is defined by the ESP32 one (boards/esp32/iotjobs_board.py) and by its unix
    twin (firmware/iotjobs_board.py) alike: a name only the twin has passes every test under
    devsim and fails on a board."""
    import ast
    import re

    def defined(path):
        names = set()
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        return names

    with open(os.path.join(ROOT, "firmware", "app.py")) as f:
        used = set(re.findall(r"\bhw\.([A-Za-z_]\w*)", f.read()))
    with open(os.path.join(ROOT, "lib", "iotjobs", "ota.py")) as f:
        used |= set(re.findall(r"\bself\.board\.([A-Za-z_]\w*)", f.read()))
    assert {"reset", "ota_state", "partition_class", "led"} <= used, used  # the scan sees them
    for path in ("boards/esp32/iotjobs_board.py", "firmware/iotjobs_board.py"):
        missing = used - defined(os.path.join(ROOT, path))
        assert not missing, f"{path} lacks {sorted(missing)}"
