from aimesh_notify.server import SPEC
from aimesh_runtime.server import main

main([SPEC])
