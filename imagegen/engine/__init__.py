"""The job engine: requests and validation, planning, the scheduler, routing, timings and outputs."""
