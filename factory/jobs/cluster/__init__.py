"""Ray and Serve for a job: joining or starting Ray (`connect`, token auth required: `auth`), the job's Serve app
(`serve_app`), lost nodes (`nodes`), where its output may live (`durable`) and submitting it (`submit`).

`connect` is the door every command that runs work on Ray comes in through, so it is named here."""

from factory.jobs.cluster.connection import connect

__all__ = ["connect"]
