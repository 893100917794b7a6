

espeakP"train*zh2seed