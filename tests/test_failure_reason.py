"""The reason a track's run failed and whether Dagster retries it, read from the structured
data Dagster records (``imaker_assets.lifecycle``); runs written straight into a test
instance, as the code server, run monitoring and the run retries leave them."""

import pytest
from dagster import DagsterRunStatus, RetryRequested, instance_for_test, job, op
from dagster._core.execution.plan.objects import ErrorSource
from dagster._utils.error import SerializableErrorInfo

from imaker_assets import lifecycle


@op
def _noop():
    pass


@job
def _track_job():
    _noop()


@pytest.fixture
def instance():
    with instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 2}}) as inst:
        yield inst


def test_a_run_worker_the_code_server_found_dead_is_explained_by_its_engine_event(instance):
    """The code server logs why the run process ended, then marks the run failed with
    Dagster's generic message: the reason gives both."""
    from dagster._grpc.server import DagsterApiServer

    run = instance.create_run_for_job(_track_job, tags={"dagster/max_retries": "0"})
    instance.report_engine_event(
        f"Run execution process for {run.run_id} was terminated by signal 9 (SIGKILL).", run,
        cls=DagsterApiServer)
    instance.report_run_failed(run)
    run = instance.get_run_by_id(run.run_id)
    assert lifecycle.will_retry(instance, run) is False
    stage, reason = lifecycle.failure_reason(instance, run)
    assert stage == "run"
    assert reason.startswith(f"run {run.run_id} failed: [DagsterApiServer] Run execution process")
    assert "signal 9 (SIGKILL)" in reason and "marked as failed" in reason


def test_run_monitoring_failure_message_is_the_reason(instance):
    run = instance.create_run_for_job(_track_job, tags={"dagster/max_retries": "0"})
    instance.report_run_failed(run, "Detected run worker status FAILED. Marking run as failed.")
    stage, reason = lifecycle.failure_reason(instance, instance.get_run_by_id(run.run_id))
    assert (stage, reason) == ("run", f"run {run.run_id} failed: Detected run worker status "
                                      "FAILED. Marking run as failed.")


def test_will_retry_follows_dagsters_tag_and_its_rule_before_the_tag_is_written(instance):
    run = instance.create_run_for_job(_track_job, tags={"dagster/max_retries": "2"})
    instance.report_run_failed(run, "worker died")
    assert instance.get_run_by_id(run.run_id).tags["dagster/will_retry"] == "true"
    assert lifecycle.will_retry(instance, run) is True   # read again: the tag came after
    # a failed run whose tag is not written yet: Dagster's own rule, from its tags
    for retries, expected in (("2", True), ("0", False)):
        bare = instance.create_run_for_job(_track_job, status=DagsterRunStatus.FAILURE,
                                           tags={"dagster/max_retries": retries})
        assert "dagster/will_retry" not in bare.tags
        assert lifecycle.will_retry(instance, bare) is expected
    done = instance.create_run_for_job(_track_job, status=DagsterRunStatus.SUCCESS,
                                       tags={"dagster/max_retries": "2"})
    assert lifecycle.will_retry(instance, done) is False
    canceled = instance.create_run_for_job(_track_job, status=DagsterRunStatus.CANCELED,
                                           tags={"dagster/max_retries": "2"})
    assert lifecycle.will_retry(instance, canceled) is False
    assert lifecycle.failure_reason(instance, canceled) == \
        ("run", f"run {canceled.run_id} was canceled")


def test_will_retry_is_false_without_run_retries():
    with instance_for_test() as inst:
        run = inst.create_run_for_job(_track_job, status=DagsterRunStatus.FAILURE,
                                      tags={"dagster/max_retries": "2"})
        assert lifecycle.will_retry(inst, run) is False


def _error(cls_name, message, cause=None):
    return SerializableErrorInfo(message=message, stack=[], cls_name=cls_name, cause=cause)


def test_an_exhausted_retry_is_told_by_the_error_behind_it():
    cause = _error("TransientError", "imaker.pipeline.TransientError: service gone\n")
    retry = _error(RetryRequested.__name__, "Exceeded max_retries of 3\n", cause)
    assert lifecycle._error_text(retry, ErrorSource.USER_CODE_ERROR) == \
        "imaker.pipeline.TransientError: service gone (Exceeded max_retries of 3)"
    wrapped = _error("DagsterExecutionStepExecutionError",
                     'Error occurred while executing op "stems":', cause)
    assert lifecycle._error_text(wrapped, ErrorSource.USER_CODE_ERROR) == \
        "imaker.pipeline.TransientError: service gone"
    assert lifecycle._error_text(wrapped, ErrorSource.FRAMEWORK_ERROR) == \
        'Error occurred while executing op "stems":'
