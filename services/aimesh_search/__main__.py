from aimesh_search.server import SPEC
from aimesh_runtime.server import main

main([SPEC])
