"""What every config section shares: the frozen, strict base model and the field types."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# Characters no header value may carry (every C0 control but HTAB, and DEL).
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Base for every config section: frozen; unknown fields are errors, so typos never pass."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
