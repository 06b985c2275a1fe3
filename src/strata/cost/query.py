"""The parameters of a usage report, shared by `GET /v1/usage` and `strata usage`.

`from` and `to` take an ISO date (2026-11-01: a whole UTC day, which `to` includes) or date-time (`to`
excluded; without a zone, UTC). Default: the current UTC month so far."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from strata.cost.records import UsageKind
from strata.store.usage import GroupBy


class UsageQuery(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True)

    group_by: GroupBy = "model"
    from_: datetime | date | None = Field(default=None, alias="from")
    to: datetime | date | None = None
    kind: UsageKind | None = None
    user: str | None = Field(default=None, min_length=1, max_length=128, description="Needs usage:read_all.")
    limit: int = Field(default=1000, ge=1, le=10_000, description="Most groups returned.")

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _iso(cls, value: object) -> object:
        if isinstance(value, str) and value:
            try:
                return date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an ISO date (2026-11-01) or date-time (2026-11-01T12:00:00Z)"
                ) from None
        return value

    @model_validator(mode="after")
    def _window(self) -> UsageQuery:
        try:
            self.since, self.until  # noqa: B018 - computed here so that a bad window is a 400, not a 500
        except OverflowError:
            raise ValueError("'from' and 'to' must lie between the years 1 and 9999 in UTC") from None
        if self.since >= self.until:
            raise ValueError(f"'from' ({iso(self.since)}) must be before 'to' ({iso(self.until)})")
        return self

    @property
    def since(self) -> datetime:
        if self.from_ is None:
            now = datetime.now(UTC)
            return datetime(now.year, now.month, 1, tzinfo=UTC)
        return _moment(self.from_)

    @property
    def until(self) -> datetime:
        if self.to is None:
            return datetime.now(UTC)
        if isinstance(self.to, datetime):
            return _moment(self.to)
        return _moment(self.to) + timedelta(days=1)  # a date: the whole day


def _moment(value: datetime | date) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime.combine(value, time(), tzinfo=UTC)


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
