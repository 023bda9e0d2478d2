"""The host agent: keeps the cron set locally, fires on time, runs restic when told."""
