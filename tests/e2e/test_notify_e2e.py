"""A Schedule's notifications end to end (issue 19): a real job fails on a real agent, and the
operator tells an HTTP receiver on loopback, started by the test, through a generic webhook
and healthchecks-style pings, with URLs from a labelled Secret that no log line shows."""

from __future__ import annotations

import json

import pytest

from e2e.harness import Receiver, World

pytestmark = [pytest.mark.cluster, pytest.mark.restic]

TOKEN = "e2e-webhook-s3cr3t-t0ken"


def test_a_failed_backup_reaches_the_webhook_and_the_healthchecks_pings(world: World, receiver: Receiver) -> None:
    world.repository()
    tree = world.source_tree()
    world.start_operator()
    broken, _ = world.failing_restic()
    world.add_agent("web-01", restic=broken)
    world.apply(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: hooks, labels: {{resticmanager.io/notification-secret: "true"}}}}
        stringData:
          webhook: {receiver.url}/hook/{TOKEN}
          ping: {receiver.url}/ping/{TOKEN}
        ---
        apiVersion: resticmanager.io/v1alpha1
        kind: Schedule
        metadata: {{name: nightly}}
        spec:
          agent: web-01
          repository: local
          schedule: "*/5 * * * * *"
          template:
            type: backup
            backup: {{paths: [{tree}]}}
          notifications:
          - {{type: webhook, urlSecretRef: {{name: hooks, key: webhook}}}}
          - {{type: healthchecks, urlSecretRef: {{name: hooks, key: ping}}}}
    """)
    _, _, _, body = receiver.wait_for("the webhook's failed notice",
                                      lambda hit: hit[1] == f"/hook/{TOKEN}")
    sent = json.loads(body)
    [job] = [j for j in world.jobs("nightly") if j["metadata"]["name"] == sent["job"]]
    assert sent["event"] == "failed" and sent["phase"] == "Failed" and sent["reason"] == "ResticFailed"
    assert (sent["namespace"], sent["schedule"], sent["agent"]) == (world.namespace, "nightly", "web-01")
    assert job["status"]["phase"] == "Failed"
    # The healthchecks pings of that same job: its start, then its failure, paired by its uid.
    run = {"rid": job["metadata"]["uid"]}
    receiver.wait_for("the job's /fail ping", lambda hit: hit[1:3] == (f"/ping/{TOKEN}/fail", run))
    pings = [hit[1] for hit in receiver.hits if hit[2] == run]
    assert pings == [f"/ping/{TOKEN}/start", f"/ping/{TOKEN}/fail"], receiver.hits
    assert not world.events("NotificationFailed")
    assert world.operator is not None and TOKEN not in world.operator.output()
