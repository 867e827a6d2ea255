from istio_pod_network_controller.cli import main

main()
