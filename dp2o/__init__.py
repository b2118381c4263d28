"""dp2o — DP²O-SR preference optimisation for Real-ISR models, as a staged, resumable data pipeline.

The library in this package never imports Prefect: every stage is a plain function over one shard
(`dp2o.stages`), so it can be tested, profiled and run without an orchestrator. `flows/` and `tasks/`
wrap those functions for Prefect.
"""

__version__ = "0.1.0"
