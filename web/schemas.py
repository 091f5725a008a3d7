"""Request and response schemas (pydantic): validation at the boundary and the OpenAPI source.

Requests are strict (no string-to-number coercion, no bools as ints) and reject unknown
fields, so a typo such as ``max_challenge`` is an error rather than a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from rev_tasks.inference.budget import MAX_BUDGET_MB, MIN_BUDGET_MB

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

ModelId = Annotated[
    str,
    StringConstraints(pattern=MODEL_ID_PATTERN, min_length=1, max_length=128),
    Field(description="id of a registered model"),
]


# A server path: no NUL (the OS cannot take it, PostgreSQL cannot store it), no control
# characters (they only serve to forge log lines).
ServerPath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$"),
    Field(description="folder under REV_MODEL_ROOTS (resolved, symlinks included)"),
]


# The compute dtype of a job's models, or of a registered model's fingerprint (as
# ``rev verify --dtype``): float32 upcasts stored fp16/bf16 weights; float16 and bfloat16 run
# the models in that precision (half the memory; the operations guide's choice on GPUs).
Dtype = Annotated[
    Literal["float32", "float16", "bfloat16"],
    Field(
        description=(
            "compute dtype of the models (as `rev verify --dtype`); a registered reference "
            "must have been registered with the same dtype"
        )
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PathRef(_Strict):
    """A model folder on the server, confined to ``REV_MODEL_ROOTS``."""

    path: ServerPath


ModelRef = ModelId | PathRef

CredentialName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    Field(description="name of one of the tenant's credentials (/v1/credentials)"),
]


class EndpointSpec(_Strict):
    """A model behind an OpenAI-compatible URL (``/v1/models``, ``/v1/completions``)."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^[^\x00-\x20\x7f]+$",
        description="base URL, e.g. https://api.example.com/v1; must pass the farm's "
        "egress allow-list (REV_ENDPOINT_ALLOW); no user info or query",
    )
    model: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="the model name the endpoint serves",
    )
    mode: Literal["logprobs", "text"] = Field(
        "logprobs", description="evidence: top-5 log-probabilities, or sampled text"
    )
    credential: CredentialName | None = None
    tolerance: Literal["weights", "quantised"] = Field(
        "weights", description="logprobs mode: the reference's weights at f32/f16, or quantised"
    )
    max_queries: int | None = Field(
        None, ge=1, le=4096, description="the test's budget (default 64 logprobs, 300 text)"
    )
    max_requests: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="requests the job may send, retries included (default: twice what "
        "its tests can use)",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description="token budget, prompt + completion (default and cap: REV_ENDPOINT_MAX_TOKENS)",
    )


class EndpointRef(_Strict):
    """The candidate is an endpoint: run on the farm's ``endpoint`` queue."""

    endpoint: EndpointSpec


CandidateRef = ModelId | PathRef | EndpointRef


class _JobParams(_Strict):
    candidate: CandidateRef
    tolerance: Literal["exact", "precision"] = "exact"
    alpha: float = Field(0.01, gt=0.0, le=0.5, description="error rate of the sequential test")
    max_challenges: int = Field(64, ge=1, le=1024, description="challenge budget")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Dtype = "float32"
    batch_size: int | None = Field(None, ge=1, le=256, description="challenges per batch")
    memory_budget_mb: int | None = Field(
        None,
        ge=MIN_BUDGET_MB,
        le=MAX_BUDGET_MB,
        description=(
            "run the models layer by layer within this many MiB (GPT-2, Llama and BERT "
            "families; same signatures as a full load). Default: the worker's "
            "REV_MEMORY_BUDGET_MB, else the whole model is loaded in memory"
        ),
    )


class VerifyJobRequest(_JobParams):
    """Is ``candidate`` the model ``reference``?"""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"kind": "verify", "reference": "minilm", "candidate": {"path": "minilm-copy"}},
                {
                    "kind": "verify",
                    "reference": {"path": "gpt2-medium"},
                    "candidate": {"path": "gpt2-medium-copy"},
                    "memory_budget_mb": 512,
                },
                {
                    "kind": "verify",
                    "reference": "smollm2",
                    "candidate": {
                        "endpoint": {
                            "url": "https://llm.example.com/v1",
                            "model": "smollm2",
                            "mode": "logprobs",
                            "credential": "example-key",
                        }
                    },
                },
                {
                    "kind": "verify",
                    "reference": {"path": "minilm"},
                    "candidate": {"path": "minilm-copy"},
                    "tolerance": "exact",
                    "alpha": 0.01,
                    "max_challenges": 64,
                    "device": "cpu",
                    "dtype": "float32",
                    "batch_size": 8,
                },
            ]
        }
    )

    kind: Literal["verify"]
    reference: ModelRef


class IdentifyJobRequest(_JobParams):
    """Which registered model is ``candidate``?"""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"kind": "identify", "candidate": {"path": "minilm-copy"}}]}
    )

    kind: Literal["identify"]


JobRequest = Annotated[VerifyJobRequest | IdentifyJobRequest, Field(discriminator="kind")]
JOB_REQUEST = TypeAdapter(JobRequest)


class ModelRegistration(_Strict):
    """Register a reference model folder; its fingerprint is computed asynchronously."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "minilm", "path": "minilm"},
                {"id": "smollm2-bf16", "path": "smollm2", "dtype": "bfloat16"},
            ]
        }
    )

    id: ModelId
    path: ServerPath
    endpoint_evidence: bool = Field(
        False,
        description="also store an endpoint fingerprint (causal LMs), so that endpoint jobs "
        "against this model run no reference inference",
    )
    dtype: Dtype = "float32"


CREDENTIAL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

CredentialName = Annotated[
    str,
    StringConstraints(pattern=CREDENTIAL_NAME_PATTERN, min_length=1, max_length=64),
    Field(description="the credential's name within the tenant (an endpoint job names it)"),
]
# A header value: one line, no edge spaces (they would be stripped on the way out).
CredentialValueText = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=8192,
        pattern=r"^[^\x00-\x1f\x7f ](?:[^\x00-\x1f\x7f]*[^\x00-\x1f\x7f ])?$",
    ),
    Field(description="the secret (an endpoint API key); stored encrypted, never returned"),
]


class CredentialValue(_Strict):
    """``PUT /v1/credentials/{name}``: create or rotate a credential."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"value": "sk-..."}]})

    value: CredentialValueText


class CredentialSet(_Strict):
    """``POST /v1/credentials``: create or rotate a credential by name."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "openai", "value": "sk-..."}]}
    )

    name: CredentialName
    value: CredentialValueText


# ----------------------------------------------------------------------------- responses
class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"]
    url: str


class Waiting(BaseModel):
    for_: Literal["fingerprints"] = Field(alias="for")
    pending: list[str] = Field(description="models registered before the job still pending")
    since: str
    until: str = Field(description="the bound: since + REV_IDENTIFY_WAIT_SECONDS")
    waited_s: float
    done: bool = Field(description="true once the job stopped waiting (all ready, or the bound)")


class Progress(BaseModel):
    challenges_done: int
    challenges_max: int
    waiting: Waiting | None = Field(
        None, description="an identify job's wait for pending fingerprints (null: none)"
    )


class Vote(BaseModel):
    validator: int
    verdict: Literal["SAME", "DIFFERENT", "UNDECIDED", "INVALID", "NONE"] = Field(
        description="NONE: an identify job that could rank no model"
    )
    digest: str
    reexecuted: list[int] | None = Field(
        None,
        description="transcript record positions this validator re-executed on the models, "
        "drawn at random after the transcript was stored (null for votes before 0003)",
    )
    executed_on: dict[str, Any] | None = Field(
        None,
        description="where this validator re-executed: worker, device and dtype (null for "
        "votes before 0008, and device/dtype null when it re-executed nothing)",
    )


class Consensus(BaseModel):
    validators: int
    quorum: int
    votes: list[Vote]
    agreeing: int
    verdict: str | None
    agreed: bool
    abstained: list[int] = Field(
        default_factory=list, description="validators that crashed and cast no vote"
    )


class DistanceSummary(BaseModel):
    count: int
    mean: float | None
    min: float | None
    max: float | None


class VerifyResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    verdict: Literal["SAME", "DIFFERENT", "UNDECIDED"] | None
    challenges_used: int
    statistic: float
    transcript_root: str
    sites: list[int]
    distances: DistanceSummary
    consensus: Consensus


class IdentifyMatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_id: str
    status: Literal["compared", "incompatible", "unavailable"]
    verdict: Literal["SAME", "DIFFERENT", "UNDECIDED"] | None
    reason: str | None
    mean_distance: float | None
    statistic: float | None
    challenges_used: int
    challenges_max: int
    transcript_root: str | None


class IdentifyResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    ranking: list[IdentifyMatch] = Field(
        description="compared models nearest first, then incompatible ones (DIFFERENT)"
    )
    unavailable: list[IdentifyMatch] = Field(
        default_factory=list, description="models not compared (pending, failed), with reason"
    )
    best: str | None
    verdict: str | None
    compared: int
    incompatible: int = 0
    registered: int
    transcript_root: str | None = None
    consensus: Consensus | None = None


class JobDocument(BaseModel):
    id: str
    tenant: str
    kind: Literal["verify", "identify"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str
    device: str
    queue: str
    request: dict[str, Any]
    progress: Progress
    result: VerifyResult | IdentifyResult | None
    error: ErrorBody | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    url: str
    transcript_url: str | None


class JobPage(BaseModel):
    jobs: list[JobDocument]
    next_cursor: str | None


class FingerprintInfo(BaseModel):
    key_id: str
    challenges: int
    bits: int
    sites: list[int]
    created_at: str


class ModelDocument(BaseModel):
    id: str
    tenant: str
    path: str
    status: Literal["pending", "ready", "failed"]
    dtype: str = Field(description="compute dtype its fingerprint is computed in")
    descriptor: dict[str, Any] | None
    error: ErrorBody | None
    fingerprint: FingerprintInfo | None
    endpoint_fingerprint: dict[str, Any] | None = None
    created_at: str
    updated_at: str
    url: str


class ModelList(BaseModel):
    models: list[ModelDocument]


class Health(BaseModel):
    status: str
    checks: dict[str, Any] | None = None
    reason: str | None = None


class CredentialDocument(BaseModel):
    """A credential as the API shows it: its name and timestamps, never its value."""

    name: str
    created_at: str | None
    rotated_at: str | None = Field(None, description="when the value was last replaced")


class CredentialList(BaseModel):
    credentials: list[CredentialDocument]
