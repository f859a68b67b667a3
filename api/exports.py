"""Exports in other tools' standards: FOCUS, the FinOps Foundation's cost and usage
format (warehouse/focus.py), as CSV or Parquet, streamed."""

from __future__ import annotations

from typing import Annotated, Literal

import duckdb
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tokentill.api.deps import RuntimeDep
from tokentill.api.finance import csv_chunks, parquet_chunks
from tokentill.api.params import Day, bad_request
from tokentill.api.reports import in_thread
from tokentill.warehouse.focus import FocusExport, read_focus

router = APIRouter(tags=["exports"])


class FocusParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Day = Field(description="The first UTC day, inclusive.")
    end: Day = Field(description="The UTC day after the last, exclusive.")
    format: Literal["csv", "parquet"] = "csv"


@router.get(
    "/exports/focus",
    summary="Costs in FOCUS 1.2 (with FOCUS 1.0's columns), one row per day, user, model, "
    "service tier, tags and charge",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/csv": {}, "application/vnd.apache.parquet": {}},
            "headers": {
                "X-Tokentill-Unpriced-Rows": {
                    "description": "Rows of usage no price covered (zero costs, x_Unpriced)"
                }
            },
        }
    },
)
async def focus(runtime: RuntimeDep, params: Annotated[FocusParams, Query()]) -> StreamingResponse:
    if params.start >= params.end:
        raise bad_request("start", f"start ({params.start}) must be before end ({params.end})")
    if (params.end - params.start).days > 366:
        raise bad_request("end", "the range is longer than a year: export it in parts")

    def read(conn: duckdb.DuckDBPyConnection) -> FocusExport:
        return read_focus(conn, params.start, params.end, runtime.settings)

    export = await in_thread(runtime, read)
    name = f"tokentill-focus-{params.start}-{params.end}.{params.format}"
    headers = {
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Tokentill-Unpriced-Rows": str(export.unpriced_rows),
    }
    if params.format == "parquet":
        return StreamingResponse(
            parquet_chunks(export.rows),
            media_type="application/vnd.apache.parquet",
            headers=headers,
        )
    return StreamingResponse(csv_chunks(export.rows), media_type="text/csv", headers=headers)
