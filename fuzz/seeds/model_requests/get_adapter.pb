
espeak-demo