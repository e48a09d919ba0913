from common.weightsync._old import *  # noqa: F401,F403  TEMPORARY during the split
from common.weightsync._old import _broadcast_opts  # noqa: F401  TEMPORARY
