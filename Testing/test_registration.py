"""Pre-flight checks of register_files that need no registration run."""

import pytest
import torch

from SAMERegistrationLib.errors import InputError
from SAMERegistrationLib.registration import check_memory
from SAMERegistrationLib.spatial.grid import Grid

CT = Grid.create((300, 512, 512), (0.8, 0.8, 1.0))


def test_a_normal_ct_fits_in_memory():
    check_memory(CT, CT, 2.0, torch.device("cpu"))


def test_a_too_fine_working_spacing_is_refused_with_advice():
    huge = Grid.create((2000, 2000, 2000), (0.5, 0.5, 0.5))
    with pytest.raises(InputError, match=r"--spacing 0.5: .*GiB.*use a larger --spacing"):
        check_memory(huge, huge, 0.5, torch.device("cpu"))
