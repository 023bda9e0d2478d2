"""The kopf operator: Schedules and ResticJobs in, schedule sets and commands out to agents."""
