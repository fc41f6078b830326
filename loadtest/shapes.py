"""Step load for locust: add users in steps to find where throughput stops growing (saturation).

    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --step-users 4 --step-time 30 \\
        --step-max-users 64 GptGrpcStreamUser
    python loadtest/run_locust.py --step --step-users 4 --step-time 30 --step-max-users 64 GptGrpcStreamUser

A separate file because locust runs any LoadTestShape it finds in the loaded files; loading this one
is how a run opts in. Its options are defined with the others in locustfile.py (workload.OPTIONS).
"""
from __future__ import annotations

from locust import LoadTestShape
from workload import StepPlan


class StepLoadShape(LoadTestShape):
    """`--step-users` more users every `--step-time` seconds up to `--step-max-users`, then stop."""

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        plan = StepPlan(options.step_users, options.step_time, options.step_max_users)
        users = plan.users_at(self.get_run_time())
        # Spawn a whole step within about a second, so each step's numbers describe that user count.
        return None if users is None else (users, float(plan.step_users))
