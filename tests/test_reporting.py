"""scripts/reporting.py: the cause of a failed run as its last lines."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

from scripts.reporting import error_summary


def test_error_summary_names_the_config_item_and_the_first_real_cause():
    parser = ConfigParser(
        {
            "factors": [2, 2, 2],
            "check": "$(_ for _ in ()).throw(ValueError('factors has 3 entries; give 2'))",
            "uses": "$[@check, @factors]",
        }
    )
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:
        parser.get_parsed_content("uses")
    assert error_summary(info.value) == "Error (while resolving config item 'check'):\n  ValueError: factors has 3 entries; give 2"


def test_error_summary_of_a_plain_error():
    try:
        raise KeyError("no such key")
    except KeyError as e:
        assert error_summary(e) == "Error:\n  KeyError: 'no such key'"
