"""Heterogeneous accelerator cost model (M2-ViT): a MAC engine for uniform INTk x INTk, a shift-add
engine for power-of-two weights, on-chip buffers and DRAM; energy, latency and EDP per layer."""
from .cost import METRICS, CostReport, LayerCost, estimate, int8_baseline, layer_cost
from .spec import HardwareError, HardwareSpec, load_hardware
from .workload import Workload, extract_workloads

__all__ = ["METRICS", "CostReport", "HardwareError", "HardwareSpec", "LayerCost", "Workload", "estimate",
           "extract_workloads", "int8_baseline", "layer_cost", "load_hardware"]
