"""ubo_core: the science of the ubo pipeline (data protocol, metrics, estimators, methods).

Imports only torch, numpy, pandas, pyyaml and tqdm, so it runs as is on a bare GPU machine;
orchestration (Prefect), tracking (MLflow) and DVC live outside and call in.
"""

__version__ = "0.1.0"
