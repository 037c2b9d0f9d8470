"""Resource policy thresholds (agent/policy.py) and the probes (agent/resources.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmoi_sync.agent.home import UserError
from qmoi_sync.agent.policy import (
    MiB,
    Policy,
    PolicyConfig,
    bulk_deferral_reason,
    changed_work,
    disk_is_low,
    disk_threshold,
    load_is_high,
)
from qmoi_sync.agent.resources import (
    FileProbe,
    ProcessUsage,
    PsutilProbe,
    detect_headless,
    filesystem_of,
)

CFG = PolicyConfig()
GiB = 1024 * MiB


@dataclass
class FakeProbe:
    on_ac: bool | None = True
    battery: float | None = None
    load_value: float | None = 0.1
    free: int | None = 50 * GiB
    total: int | None = 100 * GiB
    platform: str = "Test-x"
    headless: bool = False
    disk_calls: list[Path] = field(default_factory=list)

    def cpu_count(self) -> int:
        return 4

    def memory_total(self) -> int:
        return 8 * GiB

    def disk_free(self, path: Path) -> int | None:
        self.disk_calls.append(path)
        return self.free

    def disk_total(self, path: Path) -> int | None:
        return self.total

    def power(self) -> tuple[bool | None, float | None]:
        return self.on_ac, self.battery

    def load(self) -> float | None:
        return self.load_value


# -- battery -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("on_ac", "battery", "deferred"),
    [
        (False, 10.0, True),
        (False, 19.9, True),
        (False, 20.0, False),  # "below 20 %"
        (False, 80.0, False),
        (True, 5.0, False),  # charging: never deferred for the battery
        (None, 10.0, True),  # unknown power source with a low battery: be careful
        (None, None, False),  # no battery (desktop/server)
        (False, None, False),
    ],
)
def test_battery_threshold(on_ac: bool | None, battery: float | None, deferred: bool) -> None:
    reason = bulk_deferral_reason(CFG, on_ac, battery, [])
    assert (reason is not None) == deferred
    if deferred:
        assert "on battery at" in str(reason)


def test_battery_threshold_is_configurable() -> None:
    cfg = PolicyConfig(battery_min_percent=50)
    assert bulk_deferral_reason(cfg, False, 40.0, []) is not None
    assert bulk_deferral_reason(cfg, False, 60.0, []) is None


# -- load ----------------------------------------------------------------------------------------
def test_load_needs_two_consecutive_readings_above() -> None:
    assert not load_is_high(CFG, [])
    assert not load_is_high(CFG, [1.5])  # one spike is not sustained
    assert load_is_high(CFG, [1.5, 0.95])
    assert not load_is_high(CFG, [1.5, 0.9])  # "> 0.9"
    assert not load_is_high(CFG, [1.5, 0.5, 1.5])  # a dip breaks the streak
    assert load_is_high(CFG, [0.1, 1.0, 1.2])
    assert "system load 1.20" in str(bulk_deferral_reason(CFG, True, None, [1.0, 1.2]))
    cfg = PolicyConfig(load_readings=3, load_max=2.0)
    assert not load_is_high(cfg, [2.5, 2.5])
    assert load_is_high(cfg, [2.5, 2.5, 2.1])


def test_load_and_battery_reasons_combine() -> None:
    reason = bulk_deferral_reason(CFG, False, 5.0, [1.0, 1.0])
    assert reason is not None and "battery" in reason and "load" in reason


def test_sustained_load_defers_for_a_bounded_time() -> None:
    assert bulk_deferral_reason(CFG, True, None, [1.0, 1.0], load_high_for_s=599) is not None
    assert bulk_deferral_reason(CFG, True, None, [1.0, 1.0], load_high_for_s=600) is None


# -- disk ----------------------------------------------------------------------------------------
def test_disk_threshold_is_500_mib_or_1_percent_on_small_disks() -> None:
    assert disk_threshold(CFG, 1000 * GiB) == 500 * MiB
    assert disk_threshold(CFG, 10 * GiB) == int(10 * GiB * 0.01)  # 102 MiB on a 10 GiB disk
    assert disk_threshold(CFG, None) == 500 * MiB
    assert disk_is_low(CFG, 499 * MiB, 1000 * GiB)
    assert not disk_is_low(CFG, 500 * MiB, 1000 * GiB)
    assert not disk_is_low(CFG, 200 * MiB, 10 * GiB)
    assert disk_is_low(CFG, 100 * MiB, 10 * GiB)
    assert not disk_is_low(CFG, None, 10 * GiB)  # unknown: never block writes on a guess
    cfg = PolicyConfig(disk_min_fraction=0)
    assert disk_threshold(cfg, 10 * GiB) == 500 * MiB


# -- Policy over a probe ---------------------------------------------------------------------------
async def test_policy_sampling_and_gate(tmp_path: Path) -> None:
    probe = FakeProbe(on_ac=False, battery=10.0)
    clock = [0.0]
    policy = Policy(probe, PolicyConfig(bulk_file_bytes=MiB), clock=lambda: clock[0])
    assert not policy.allow_bulk() and not policy.bulk_ok.is_set()
    assert policy.state() == "deferring_bulk"
    assert policy.defer_bulk(2 * MiB) is not None
    assert policy.defer_bulk(MiB) is None  # small work always runs
    probe.on_ac = True
    allowed_again, power_changed = policy.sample()
    assert allowed_again and power_changed
    assert policy.allow_bulk() and policy.bulk_ok.is_set() and policy.state() == "normal"
    assert policy.sample() == (False, False)

    # load: the bounded deferral counts from the first high pair of readings
    probe.load_value = 1.5
    policy.sample()
    assert policy.allow_bulk()
    clock[0] = 10.0
    policy.sample()
    assert not policy.allow_bulk()
    clock[0] = 10.0 + CFG.load_max_defer_s
    assert policy.sample()[0] and policy.allow_bulk()
    probe.load_value = 0.2
    policy.sample()
    assert policy.load_high_since is None

    # disk
    assert policy.disk_blocked(tmp_path) is None
    probe.free = 100 * MiB
    note = policy.disk_blocked(tmp_path)
    assert note is not None
    assert note.startswith(f"disk almost full on {filesystem_of(tmp_path)}: 100 MiB free;")
    assert note.endswith("not writing new files until space is freed")
    assert policy.state() == "disk_full"
    status = policy.status()
    assert status.state == "disk_full" and status.reasons == [note]
    probe.free = 10 * GiB
    assert policy.disk_blocked(tmp_path) is None and policy.state() == "normal"


def test_capabilities_are_clamped_to_the_wire() -> None:
    probe = FakeProbe(on_ac=False, battery=100.4, free=-5)
    caps = Policy(probe).capabilities(Path("/"), now=1234.5)
    assert caps.battery_percent == 100.0 and caps.disk_free == 0
    assert (caps.cpu_count, caps.memory_total, caps.measured_at) == (4, 8 * GiB, 1234)
    assert caps.on_ac is False and caps.headless is False


def test_policy_config_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    assert PolicyConfig.load(path) == PolicyConfig()
    path.write_text(json.dumps({"battery_min_percent": 30, "sample_interval_s": 1}))
    cfg = PolicyConfig.load(path)
    assert cfg.battery_min_percent == 30 and cfg.sample_interval_s == 1
    path.write_text(json.dumps({"battery_min_percnt": 30}))
    with pytest.raises(UserError, match="invalid policy settings"):
        PolicyConfig.load(path)
    path.write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        PolicyConfig.load(path)


def test_changed_work_counts_what_a_scan_would_read(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a.txt").write_text("aaaa")
    (tmp_path / "d" / "b.txt").write_text("bb")
    os.symlink(tmp_path / "a.txt", tmp_path / "link")
    assert changed_work(tmp_path, {}) == (2, 6)
    st = (tmp_path / "a.txt").stat()
    known = {"a.txt": (st.st_size, st.st_mtime_ns, st.st_ino)}
    assert changed_work(tmp_path, known) == (1, 2)


# -- probes --------------------------------------------------------------------------------------
def test_file_probe_replaces_only_the_readings_it_has(tmp_path: Path) -> None:
    base = FakeProbe(on_ac=True, battery=None, load_value=0.3)
    path = tmp_path / "r.json"
    probe = FileProbe(path, base)
    assert probe.power() == (True, None)  # no file yet: the real readings
    path.write_text(json.dumps({"on_ac": False, "battery_percent": 12, "disk_free": 7}))
    assert probe.power() == (False, 12.0)
    assert probe.disk_free(tmp_path) == 7
    assert probe.disk_total(tmp_path) == 100 * GiB  # not in the file
    assert probe.load() == 0.3 and probe.cpu_count() == 4 and probe.platform == "Test-x"
    path.write_text('{"on_ac": tr')  # half-written: keep the last good readings
    assert probe.power() == (False, 12.0)
    path.write_text(json.dumps({"headless": True, "load": None, "platform": "P"}))
    assert probe.headless and probe.load() is None and probe.platform == "P"


def test_psutil_probe_reads_this_machine(tmp_path: Path) -> None:
    probe = PsutilProbe()
    assert probe.cpu_count() >= 1 and probe.memory_total() > 0
    free, total = probe.disk_free(tmp_path), probe.disk_total(tmp_path)
    assert free is not None and total is not None and 0 <= free <= total
    assert probe.disk_free(tmp_path / "missing" / "x") is None
    load = probe.load()
    assert load is None or load >= 0
    _on_ac, battery = probe.power()
    assert battery is None or 0 <= battery <= 100
    assert PsutilProbe(headless_flag=True).headless


def test_headless_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_headless(flag=True)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert detect_headless()
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert not detect_headless()


def test_process_usage() -> None:
    usage = ProcessUsage(os.getpid())
    sum(i * i for i in range(200_000))
    usage.sample()
    assert usage.rss_bytes > 0 and usage.cpu_percent >= 0 and usage.uptime_s >= 0
