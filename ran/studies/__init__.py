"""The paper's studies (label noise, ARL vs NAL, attention type, mask structure): their grids
as data (:mod:`~ran.studies.tables`), one cell's run (:mod:`~ran.studies.cell`) and the
paper-style report (:mod:`~ran.studies.report`)."""

from ran.studies.tables import STUDIES, get_study

__all__ = ["STUDIES", "get_study"]
