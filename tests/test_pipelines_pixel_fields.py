"""The pixel-UNet loader refuses flow-scheduler fields and thresholding it cannot map (issue 14, item 2)."""

import pytest
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from models.diffusers_loader import UnsupportedConfig, map_scheduler_config


@pytest.mark.parametrize("field,value", [("invert_sigmas", True), ("shift_terminal", 0.1),
                                         ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
                                         ("use_beta_sigmas", True), ("stochastic_sampling", True)])
def test_flow_fields_are_refused_by_name(field, value):
    config = dict(FlowMatchEulerDiscreteScheduler().config, _class_name="FlowMatchEulerDiscreteScheduler")
    assert map_scheduler_config(config).kind == "flow"
    with pytest.raises(UnsupportedConfig, match=f"'{field}'"):
        map_scheduler_config(dict(config, **{field: value}))


def test_thresholding_is_refused_by_name():
    config = dict(DDPMScheduler().config, _class_name="DDPMScheduler")
    with pytest.raises(UnsupportedConfig, match="'thresholding'"):
        map_scheduler_config(dict(config, thresholding=True))
