"""The pixel-UNet loader refuses flow-scheduler fields it cannot map and maps thresholding (issue 14, item 2)."""

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


def test_thresholding_maps_to_a_dynamic_threshold_and_is_refused_where_the_scheduler_ignores_it():
    from samplers.denoiser import DynamicThreshold

    config = dict(DDPMScheduler().config, _class_name="DDPMScheduler")
    mapped = map_scheduler_config(dict(config, thresholding=True, sample_max_value=2.0))
    assert mapped.data_clip == DynamicThreshold(0.995, 2.0)
    with pytest.raises(UnsupportedConfig, match="model 'cat': scheduler config field 'thresholding'"):
        map_scheduler_config(dict(config, _class_name="EulerDiscreteScheduler", thresholding=True), "cat")


@pytest.mark.parametrize("value", ["fixed_large", "fixed_large_log", "learned_mystery"])
def test_variance_types_our_samplers_do_not_draw_are_refused(value):
    config = dict(DDPMScheduler().config, _class_name="DDPMScheduler", variance_type=value)
    with pytest.raises(UnsupportedConfig, match="model 'cat': scheduler config field 'variance_type'"):
        map_scheduler_config(config, "cat")
