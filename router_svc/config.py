"""router_svc settings, read once from TOKENS_* variables."""
import dataclasses
import pathlib

from common import catalog, config

MiB = 1024 * 1024
HOLD_TTL_S_DEFAULT = config.HOLD_TTL_S_DEFAULT


@dataclasses.dataclass(frozen=True)
class Settings:
    server: config.ServerSettings
    database_url: str
    database_schema: str
    catalog_path: pathlib.Path
    ledger_addr: str
    ledger_timeout_s: float = 3.0
    # Backends: connecting is quick or it is down; a model may think for a while
    # between tokens; a whole non-streamed answer has an outer bound.
    backend_connect_timeout_s: float = 3.0
    backend_idle_timeout_s: float = 120.0
    backend_total_timeout_s: float = 600.0
    backend_max_connections: int = 512
    # A backend that refused a connection is skipped for this long.
    backend_down_s: float = 2.0
    # Settlements go to ledger_svc in batches; what it cannot take waits in the outbox.
    settle_batch_max: int = 500
    # Waiting a little gathers more settlements per RPC (each costs ledger_svc
    # and this service ~0.5 ms of CPU); usage still shows within a second.
    settle_linger_s: float = 0.025
    settle_queue_max: int = 50_000
    outbox_retry_s: float = 1.0
    # A call still running this long after it started claims its hold (ledger_svc
    # lets an unclaimed hold lapse after TOKENS_HOLD_CLAIM_S, 60 by default), and claims
    # it again every third of TOKENS_HOLD_TTL_S while it runs. Both are ledger_svc's
    # settings, read here too: a stream whose hold could lapse (the ledger took none of
    # its claims) is ended before it does.
    hold_claim_after_s: float = 5.0
    hold_ttl_s: int = HOLD_TTL_S_DEFAULT
    hold_claim_s: int = config.HOLD_CLAIM_S_DEFAULT
    # The longest a streamed call may run, whatever its backend does (an hour); a
    # non-streamed one is bounded by backend_total_timeout_s.
    call_max_s: float = 3600.0
    prices_ttl_s: float = 5.0
    # Benchmarks of the ledger hop only: run calls that no hold covers. Never
    # set in production: every such call is free.
    allow_unheld_for_benchmarks: bool = False
    # Media. The public address of the API: image URLs point here (never at a backend).
    public_base_url: str = config.PUBLIC_BASE_URL_DEFAULT
    # Largest request message: a 25 MB audio upload with its form and envelope fits.
    max_request_bytes: int = 32 * MiB
    # Image URLs stay valid this long (OpenAI's last an hour).
    image_url_ttl_s: float = 3600.0
    # Video jobs are followed every video_poll_s, video_poll_concurrency backend calls at
    # once, video_poll_batch jobs per pass; a job not finished within video_job_timeout_s
    # fails (and costs nothing), which must come before ledger_svc's hold expires.
    video_poll_s: float = 1.0
    video_poll_concurrency: int = 16
    video_poll_batch: int = 64
    video_job_timeout_s: float = 600.0
    # Transcriptions are decoded here (billing never trusts the backend): at most this many
    # at once, each within a time bound.
    audio_decodes_max: int = 2
    audio_decode_timeout_s: float = 120.0

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            server=config.ServerSettings.from_env(default_port=50054),
            database_url=config.database_url("router"),
            database_schema=config.env_str("TOKENS_DATABASE_SCHEMA", ""),
            catalog_path=catalog.default_path(),
            ledger_addr=config.env_str("TOKENS_LEDGER_ADDR", "127.0.0.1:50053"),
            ledger_timeout_s=config.env_float("TOKENS_LEDGER_TIMEOUT_S", 3.0, minimum=0.1),
            hold_claim_after_s=config.env_float("TOKENS_HOLD_CLAIM_AFTER_S", 5.0, minimum=0.01),
            hold_ttl_s=config.env_int("TOKENS_HOLD_TTL_S", HOLD_TTL_S_DEFAULT, minimum=1, maximum=7 * 86400),
            hold_claim_s=config.env_int("TOKENS_HOLD_CLAIM_S", config.HOLD_CLAIM_S_DEFAULT, minimum=1,
                                        maximum=7 * 86400),
            call_max_s=config.env_float("TOKENS_CALL_MAX_S", 3600.0, minimum=1),
            backend_connect_timeout_s=config.env_float("TOKENS_BACKEND_CONNECT_TIMEOUT_S", 3.0, minimum=0.1),
            backend_idle_timeout_s=config.env_float("TOKENS_BACKEND_IDLE_TIMEOUT_S", 120.0, minimum=1),
            backend_total_timeout_s=config.env_float("TOKENS_BACKEND_TOTAL_TIMEOUT_S", 600.0, minimum=1),
            backend_max_connections=config.env_int("TOKENS_BACKEND_MAX_CONNECTIONS", 512, minimum=1),
            allow_unheld_for_benchmarks=config.env_bool("TOKENS_ALLOW_UNHELD_CALLS_FOR_BENCHMARKS", False),
            public_base_url=config.public_base_url(),
            image_url_ttl_s=config.env_float("TOKENS_IMAGE_URL_TTL_S", 3600.0, minimum=1),
            video_poll_s=config.env_float("TOKENS_VIDEO_POLL_S", 1.0, minimum=0.05),
            video_job_timeout_s=_video_job_timeout_s(),
            audio_decodes_max=config.env_int("TOKENS_AUDIO_DECODES_MAX", 2, minimum=1, maximum=64),
        )


def _video_job_timeout_s() -> float:
    timeout_s = config.env_float("TOKENS_VIDEO_JOB_TIMEOUT_S", 600.0, minimum=1)
    hold_ttl_s = config.env_int("TOKENS_HOLD_TTL_S", HOLD_TTL_S_DEFAULT, minimum=1)
    # A minute to spare for the last poll and the settlement's trip to the ledger (a quarter
    # of a lifetime shorter than four minutes, which only tests set).
    spare_s = min(60, hold_ttl_s / 4)
    if timeout_s > hold_ttl_s - spare_s:
        raise config.ConfigError("TOKENS_VIDEO_JOB_TIMEOUT_S", f"must be at least {spare_s:g} s below ledger_svc's "
                                 f"hold lifetime (TOKENS_HOLD_TTL_S = {hold_ttl_s} s), got {timeout_s:g}")
    return timeout_s
