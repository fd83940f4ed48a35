from graphopt.samples import main

main()
