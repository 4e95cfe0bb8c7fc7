"""python train.py fit|validate|test|predict --config configs/<x>.yaml"""
from stacktrain.cli import main

main()
