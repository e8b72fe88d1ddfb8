from aimesh_runtime.server import main
from aimesh_search.server import SPEC

main([SPEC])
