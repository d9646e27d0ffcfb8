import pytest

from vitq.hardware import HardwareError, load_hardware


def test_defaults_carry_published_values():
    hw = load_hardware()
    assert hw.energy.mult_pj_8x8 == 0.2 and hw.energy.add_pj_32 == 0.1  # Horowitz ISSCC 2014
    assert hw.schedule == "pipeline"


def test_partial_override(tmp_path):
    f = tmp_path / "hw.yaml"
    f.write_text("engines: {shift_units: 2048}\n")
    hw = load_hardware(f)
    assert hw.engines.shift_units == 2048 and hw.engines.mac_units == 1024


@pytest.mark.parametrize("text, match", [
    ("energy: {mult_pj: 1}\n", "unknown key 'energy.mult_pj'"),
    ("cache: {}\n", "unknown section 'cache'"),
    ("memory: {dram_gb_per_s: -3}\n", "memory.dram_gb_per_s"),
    ("schedule: parallel\n", "schedule"),
    ("energy: [1, 2\n", "not valid YAML"),
])
def test_bad_files_are_named(tmp_path, text, match):
    f = tmp_path / "hw.yaml"
    f.write_text(text)
    with pytest.raises(HardwareError, match=match):
        load_hardware(f)
    with pytest.raises(HardwareError, match="does not exist"):
        load_hardware(tmp_path / "missing.yaml")
