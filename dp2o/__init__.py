"""dp2o — DP²O-SR preference optimisation for Real-ISR models, as a staged, resumable data pipeline.

The library in this package never imports Prefect: every stage is declared once in `dp2o.registry` and
run by one driver (`dp2o.driver`) over plain functions of one shard, so it can be tested, profiled and run
without an orchestrator. `flows/` and `tasks/` are a thin Prefect executor of that driver.
"""

from dp2o.lazy import lazy_exports

__version__ = "0.1.0"

#: loaded on first use: `import dp2o` stays cheap
__getattr__, __dir__ = lazy_exports(
    "dp2o", {"open_image": "dp2o.images", "image_ref": "dp2o.images"}, globals()
)
