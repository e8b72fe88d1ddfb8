from aimesh_recommend.server import SPEC
from aimesh_runtime.server import main

main([SPEC])
